//! Goal: the gateway binds its ports while connections of a previous program on them sit in
//! TIME-WAIT (seen when benchmarking peers one after another on the same ports: Prosody's
//! closed connections kept the gateway from starting for a minute). Without SO_REUSEADDR on the
//! listeners, bind fails with "address in use".
//! Method: a plain std listener (no SO_REUSEPORT, like another server) accepts a connection and
//! closes it first, so its side stays in TIME-WAIT; then the gateway starts on that port and must
//! become ready and serve a login. A second part restarts the gateway itself after a graceful stop.

mod support;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_ports, http_get, users_on_shard, ServerBuilder};

#[test]
fn binds_a_port_left_in_time_wait_by_another_program() {
    let [c2s, tls, admin] = free_ports();
    {
        let other = TcpListener::bind(("127.0.0.1", c2s)).unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", c2s)).unwrap();
        let (server_side, _) = other.accept().unwrap();
        // The accepting side closes first: its socket goes to TIME-WAIT on port `c2s`.
        drop(server_side);
        let mut buf = [0u8; 1];
        let _ = client.read(&mut buf);
        drop(client);
    }
    let dir = tempfile::tempdir().unwrap();
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let mut child = Command::new(support::gateway_bin())
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--shards",
            "2",
            "serve",
            "--no-pin",
        ])
        .args(["--c2s-addr", &addr(c2s), "--tls-addr", &addr(tls)])
        .args(["--admin-addr", &addr(admin)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin_addr = addr(admin).parse().unwrap();
    let ready = loop {
        if http_get(admin_addr, "/health").is_some_and(|(code, _)| code == 200) {
            break true;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let mut log = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut log);
    assert!(
        ready,
        "gateway did not start on a port in TIME-WAIT:\n{log}"
    );
    assert!(status.success(), "exit {status:?}\n{log}");
}

#[test]
fn restarts_on_the_same_ports_after_a_graceful_stop() {
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let mut server = ServerBuilder::new().user(&a).user(&b).start();
    let mut ca = server.login(&a, "r");
    let mut cb = server.login_direct_tls(&b, "r");
    ca.assert_alive();
    cb.assert_alive();
    server.stop();
    ca.expect_close();
    cb.expect_close();
    server.restart();
    let mut again = server.login(&a, "r2");
    again.assert_alive();
}

#[test]
fn test_servers_get_three_distinct_ports() {
    // Goal: the harness never gives a server one port for two listeners (seen in CI-like runs:
    // "two listeners share one address" when ports were picked one at a time). Many draws make a
    // repeat likely if the picks could collide.
    for _ in 0..2_000 {
        let [a, b, c] = free_ports();
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
    }
}
