//! Accept records: inbound IPv4 and IPv6 connections accepted on the local ports the agent
//! watches (`--accept-port`), with both addresses from the kernel's socket; nothing for other
//! ports, for failed accepts, or when no port is watched.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
};

use integration_tests::{Agent, as_u64, free_ports, is};
use serde_json::Value;

fn accept_on(port: u16) -> impl Fn(&Value) -> bool {
    move |r| {
        r.get("accept").is_some()
            && is::from_pid(r, std::process::id())
            && as_u64(&r["accept"]["localPort"]) == u64::from(port)
    }
}

/// Listens on `bind`, connects to it and accepts (std accepts with accept4): the accepted
/// socket's descriptor and the client's local address.
fn connect_and_accept(bind: SocketAddr) -> (i32, SocketAddr) {
    let listener = TcpListener::bind(bind).expect("listen");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, peer) = listener.accept().expect("accept");
    assert_eq!(peer, client.local_addr().expect("client address"));
    let fd = accepted.as_raw_fd();
    // Kept open until the record is checked: the descriptor number must not be reused.
    std::mem::forget(accepted);
    (fd, peer)
}

#[test]
fn connections_accepted_on_watched_ports_are_recorded_with_both_addresses() {
    let [watched, other] = free_ports();
    let mut agent = Agent::start([
        "--host-id",
        "it-accept",
        "--accept-port",
        &watched.to_string(),
    ]);
    let start = &agent.history[0]["agent"];
    assert_eq!(start["acceptPorts"], serde_json::json!([watched]));
    assert!(
        start["sensors"]
            .as_array()
            .expect("sensors")
            .iter()
            .any(|s| s["kind"] == "accept" && s["hook"] != "off"),
        "{start}"
    );

    for (ip, family) in [
        ("127.0.0.1", "ADDRESS_FAMILY_INET"),
        ("::1", "ADDRESS_FAMILY_INET6"),
    ] {
        let bind: SocketAddr = SocketAddr::new(ip.parse().expect("ip"), watched);
        let (fd, peer) = connect_and_accept(bind);
        let r = agent.wait_for(&format!("the accept on {ip}"), accept_on(watched));
        assert_eq!(r["hostId"], "it-accept");
        let a = &r["accept"];
        assert_eq!(a["family"], family);
        assert_eq!(a["localAddress"], ip);
        assert_eq!(a["remoteAddress"], peer.ip().to_string());
        assert_eq!(as_u64(&a["remotePort"]), u64::from(peer.port()));
        assert_eq!(as_u64(&a["fd"]), fd as u64);
        assert_eq!(a["socketType"], "stream");
        assert_eq!(a["syscall"], "accept4");
        // The process that accepted, as on every record.
        assert_eq!(as_u64(&r["process"]["pid"]), u64::from(std::process::id()));
        // SAFETY: closing the accepted socket kept open above.
        unsafe { libc::close(fd) };
    }

    // The plain accept system call.
    let listener = TcpListener::bind(("127.0.0.1", watched)).expect("listen");
    let client = TcpStream::connect(("127.0.0.1", watched)).expect("connect");
    // SAFETY: accept(2) on our own listening socket, addresses not wanted.
    let fd = unsafe {
        libc::accept(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert!(fd >= 0, "accept: {}", std::io::Error::last_os_error());
    let r = agent.wait_for("the plain accept", accept_on(watched));
    assert_eq!(r["accept"]["syscall"], "accept");
    assert_eq!(
        as_u64(&r["accept"]["remotePort"]),
        u64::from(client.local_addr().expect("client").port())
    );
    // SAFETY: closing the socket accepted above.
    unsafe { libc::close(fd) };
    drop(client);

    // A failed accept (nothing waiting on a non-blocking listener) accepted nothing.
    listener.set_nonblocking(true).expect("non-blocking");
    let err = listener.accept().expect_err("nothing to accept");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    drop(listener);

    // An unwatched port: accepted, not recorded. The next accept on the watched port marks
    // the end of what the agent had to say about it.
    let (fd_other, _) = connect_and_accept(SocketAddr::from(([127, 0, 0, 1], other)));
    let (fd_marker, marker_peer) = connect_and_accept(SocketAddr::from(([127, 0, 0, 1], watched)));
    let between = agent.records_until("the marker accept", move |r| {
        accept_on(watched)(r) && as_u64(&r["accept"]["remotePort"]) == u64::from(marker_peer.port())
    });
    let accepts: Vec<&Value> = between
        .iter()
        .filter(|r| r.get("accept").is_some())
        .collect();
    assert!(
        accepts.is_empty(),
        "only accepts on watched ports are recorded, and failed ones never: {accepts:#?}"
    );
    // SAFETY: closing the sockets accepted above.
    unsafe {
        libc::close(fd_other);
        libc::close(fd_marker);
    }
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

#[test]
fn without_accept_ports_nothing_is_recorded_and_the_start_record_says_so() {
    let [port] = free_ports();
    let mut agent = Agent::start(["--host-id", "it-accept-off"]);
    let start = agent.history[0]["agent"].clone();
    assert!(
        start
            .get("acceptPorts")
            .is_none_or(|p| p == &serde_json::json!([])),
        "{start}"
    );
    let accept_sensor = start["sensors"]
        .as_array()
        .expect("sensors")
        .iter()
        .find(|s| s["kind"] == "accept")
        .cloned();
    assert_eq!(
        accept_sensor.map(|s| s["hook"].clone()),
        Some(Value::from("off"))
    );
    let (fd, _) = connect_and_accept(SocketAddr::from(([127, 0, 0, 1], port)));
    // A connect of this process after the accept marks the end of what the agent saw.
    let marker = TcpListener::bind("127.0.0.1:0").expect("listen");
    let marker_port = marker.local_addr().expect("addr").port();
    let _client = TcpStream::connect(("127.0.0.1", marker_port)).expect("connect");
    let between = agent.records_until("the marker connect", move |r| {
        r.get("connect").is_some()
            && is::from_pid(r, std::process::id())
            && as_u64(&r["connect"]["port"]) == u64::from(marker_port)
    });
    assert!(
        between.iter().all(|r| r.get("accept").is_none()),
        "no accept is recorded without accept ports"
    );
    // SAFETY: closing the socket accepted above.
    unsafe { libc::close(fd) };
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}
