//! A real ssh login: the records of what the logged-in user does, directly and through sudo,
//! name the person, the login session and where it came from.

use integration_tests::{Agent, TestDir, as_u64, is, set_mode, sshd};

#[test]
fn ssh_login_and_sudo_are_attributed_to_the_person_and_the_session() {
    let uid = sshd::ensure_user();
    let w = TestDir::new("login");
    let open_chart = w.file("open-chart.txt", "synthetic\n");
    set_mode(&open_chart, 0o644);
    let root_chart = w.file("root-chart.txt", "synthetic\n");
    set_mode(&root_chart, 0o600);
    let server = sshd::Sshd::start();
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    let out = server.ssh(&format!(
        "echo $SSH_CONNECTION; cat /proc/self/sessionid; echo; cat {}; sudo -n cat {}",
        open_chart.display(),
        root_chart.display()
    ));
    let mut lines = out.lines();
    let conn: Vec<&str> = lines
        .next()
        .expect("SSH_CONNECTION")
        .split_whitespace()
        .collect();
    let client_port: u64 = conn[1].parse().expect("client port");
    let session: u64 = lines
        .next()
        .expect("session id")
        .trim()
        .parse()
        .expect("numeric");

    let r = agent.wait_for("the user's own read", |r| is::open_of(&open_chart)(r));
    let id = &r["process"]["identity"];
    assert_eq!(id["user"], sshd::USER, "{id}");
    assert_eq!(as_u64(&id["uid"]), u64::from(uid));
    assert_eq!(as_u64(&id["loginUid"]), u64::from(uid));
    assert_eq!(id["loginUser"], sshd::USER);
    assert_eq!(as_u64(&id["auditSession"]), session);
    let s = &id["session"];
    assert_eq!(s["kind"], "ssh", "{s}");
    assert_eq!(s["user"], sshd::USER);
    assert_eq!(as_u64(&s["id"]), session);
    assert_eq!(s["sourceAddress"], "127.0.0.1");
    assert_eq!(as_u64(&s["sourcePort"]), client_port);
    assert_eq!(as_u64(&s["localPort"]), u64::from(server.port));
    assert_eq!(s["sourceFrom"], "socket", "from sshd's own connection");
    assert!(
        s["leaderExe"].as_str().is_some_and(|e| e.ends_with("sshd")),
        "{s}"
    );
    assert!(s["loginTime"].as_str().is_some(), "{s}");
    let chain = id["chain"].as_array().expect("chain");
    assert_eq!(chain.len(), 1, "{chain:?}");
    assert_eq!(chain[0]["via"], "login");
    assert_eq!(chain[0]["user"], sshd::USER);

    let r = agent.wait_for("the sudo read", |r| {
        is::open_of(&root_chart)(r) && r["open"]["outcome"]["success"] == true
    });
    let id = &r["process"]["identity"];
    assert_eq!(id["uid"], 0, "acts as root: {id}");
    assert_eq!(id["user"], "root");
    assert_eq!(
        as_u64(&id["loginUid"]),
        u64::from(uid),
        "the human behind it"
    );
    assert_eq!(id["loginUser"], sshd::USER);
    assert_eq!(as_u64(&id["auditSession"]), session);
    assert_eq!(id["session"]["sourceAddress"], "127.0.0.1");
    assert_eq!(as_u64(&id["session"]["sourcePort"]), client_port);
    let chain: Vec<(String, String)> = id["chain"]
        .as_array()
        .expect("chain")
        .iter()
        .map(|l| {
            (
                l["user"].as_str().unwrap_or("").to_owned(),
                l["via"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        chain,
        vec![
            (sshd::USER.to_owned(), "login".to_owned()),
            ("root".to_owned(), "sudo".to_owned())
        ]
    );
    agent.stop();
}
