//! Goal: logs written to a pipe or file are plain text (no ANSI colour codes), and the ready line
//! is there. Method: start the real binary with stderr piped, read until `gateway ready` (with a
//! deadline), stop it with SIGTERM, and check the captured text.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Three distinct free ports, all held while the OS picks them (one at a time could repeat one).
fn free_ports() -> [u16; 3] {
    let held: Vec<_> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

#[test]
fn logs_to_a_pipe_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let [c2s, tls, admin] = free_ports();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--shards",
            "1",
            "serve",
            "--no-pin",
        ])
        .args(["--c2s-addr", &addr(c2s), "--tls-addr", &addr(tls)])
        .args(["--admin-addr", &addr(admin)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    while !String::from_utf8_lossy(&log).contains("gateway ready") {
        assert!(
            Instant::now() < deadline,
            "no ready line: {}",
            String::from_utf8_lossy(&log)
        );
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            log.extend(chunk);
        }
    }
    // `kill` from the shell keeps this test free of unsafe.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}");
    let text = String::from_utf8_lossy(&log);
    assert!(!text.contains('\u{1b}'), "ANSI escape in piped log: {text}");
}
