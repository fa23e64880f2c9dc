//! Connect records for IPv4, IPv6 and unix sockets: accepted, refused and in progress.

use std::{
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
};

use integration_tests::{Agent, TestDir, as_i64, as_u64, is};
use serde_json::Value;

fn connect_to(port: u16) -> impl Fn(&Value) -> bool {
    move |r| {
        r.get("connect").is_some()
            && is::from_pid(r, std::process::id())
            && as_u64(&r["connect"]["port"]) == u64::from(port)
    }
}

/// A port nothing listens on.
fn closed_port(addr: &str) -> u16 {
    let l = TcpListener::bind(addr).expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn tcp_connects_on_ipv4_and_ipv6_accepted_and_refused() {
    let mut agent = Agent::start(["--host-id", "it-connect"]);
    for (bind, family, text) in [
        ("127.0.0.1:0", "ADDRESS_FAMILY_INET", "127.0.0.1"),
        ("[::1]:0", "ADDRESS_FAMILY_INET6", "::1"),
    ] {
        let listener = TcpListener::bind(bind).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let r = agent.wait_for(&format!("accepted connect to {text}"), connect_to(port));
        assert_eq!(r["hostId"], "it-connect");
        let c = &r["connect"];
        assert_eq!(c["family"], family);
        assert_eq!(c["address"], text);
        assert_eq!(c["outcome"]["success"], true);
        assert_eq!(c["addressSource"], "ADDRESS_SOURCE_SOCKET");
        assert_eq!(c["socketType"], "stream");
        assert_eq!(
            as_u64(&c["localPort"]),
            u64::from(stream.local_addr().expect("local").port())
        );

        let refused = closed_port(bind);
        let addr: SocketAddr = if text == "::1" {
            SocketAddr::from((Ipv6Addr::LOCALHOST, refused))
        } else {
            SocketAddr::from(([127, 0, 0, 1], refused))
        };
        assert!(TcpStream::connect(addr).is_err());
        let r = agent.wait_for(&format!("refused connect to {text}"), connect_to(refused));
        let c = &r["connect"];
        assert_eq!(c["outcome"]["success"], false);
        assert_eq!(c["outcome"]["errno"], "ECONNREFUSED");
        assert_eq!(c["address"], text);
        assert_eq!(c["family"], family);
    }
    agent.stop();
}

#[test]
fn non_blocking_connect_reports_in_progress() {
    let mut agent = Agent::start(["--host-id", "it-connect"]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    // SAFETY: plain socket calls on a fresh descriptor.
    let ret = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error().raw_os_error();
        libc::close(fd);
        (r, err)
    };
    let r = agent.wait_for("non-blocking connect", connect_to(port));
    let c = &r["connect"];
    if ret.0 == -1 && ret.1 == Some(libc::EINPROGRESS) {
        assert_eq!(c["inProgress"], true);
        assert_eq!(c["outcome"]["errno"], "EINPROGRESS");
        assert_eq!(as_i64(&c["outcome"]["ret"]), -115);
        assert_eq!(c["addressSource"], "ADDRESS_SOURCE_SOCKET");
    } else {
        // Loopback may complete at once; the record must then say so.
        assert_eq!(ret.0, 0, "unexpected connect result {ret:?}");
        assert_eq!(c["outcome"]["success"], true);
    }
    assert_eq!(c["address"], "127.0.0.1");
    agent.stop();
}

#[test]
fn unix_socket_connect_carries_the_path() {
    let dir = TestDir::new("unix");
    let path = dir.path().join("service.sock");
    let _listener = UnixListener::bind(&path).expect("bind unix");
    let mut agent = Agent::start(["--host-id", "it-connect"]);
    let _s = UnixStream::connect(&path).expect("connect unix");
    let r = agent.wait_for("unix connect", |r| {
        r["connect"]["unixPath"].as_str() == path.to_str() && is::from_pid(r, std::process::id())
    });
    assert_eq!(r["connect"]["family"], "ADDRESS_FAMILY_UNIX");
    assert_eq!(r["connect"]["outcome"]["success"], true);
    let missing = dir.path().join("nobody-home.sock");
    assert!(UnixStream::connect(&missing).is_err());
    let r = agent.wait_for("failed unix connect", |r| {
        r["connect"]["unixPath"].as_str() == missing.to_str()
    });
    assert_eq!(r["connect"]["outcome"]["errno"], "ENOENT");
    agent.stop();
}
