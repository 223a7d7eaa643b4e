//! The real binary: `check --json` on this machine, and dry runs that write nothing.

mod common;

use std::process::Command;

use common::{copy_fixture, list_files};

const BIN: &str = env!("CARGO_BIN_EXE_tuning");

#[test]
fn check_json_on_this_machine() {
    let out = Command::new(BIN)
        .args(["check", "--connections", "1000", "--json"])
        .output()
        .expect("run tuning");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(json["target"]["connections"], 1000);
    assert_eq!(json["target"]["role"], "server");
    assert!(json["topology"]["cpus"].as_u64().unwrap() >= 1);
    assert!(!json["topology"]["shards"].as_array().unwrap().is_empty());
    let checks = json["checks"].as_array().expect("checks array");
    let mut counts = [0u64; 3];
    for c in checks {
        for field in ["name", "current", "needed", "status", "fix"] {
            assert!(c[field].is_string(), "{field} in {c}");
        }
        match c["status"].as_str().unwrap() {
            "ok" => counts[0] += 1,
            "warn" => counts[1] += 1,
            "blocks" => counts[2] += 1,
            other => panic!("status {other}"),
        }
    }
    for name in [
        "RLIMIT_NOFILE soft",
        "RLIMIT_NOFILE hard",
        "fs.nr_open",
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.tcp_mem",
        "memory",
        "RLIMIT_MEMLOCK",
        "vm.max_map_count",
        "cpu topology",
        "shard pinning",
    ] {
        assert!(checks.iter().any(|c| c["name"] == name), "missing {name}");
    }
    let summary = &json["summary"];
    assert_eq!(summary["ok"], counts[0]);
    assert_eq!(summary["warn"], counts[1]);
    assert_eq!(summary["blocks"], counts[2]);
    let expected = if counts[2] > 0 {
        2
    } else if counts[1] > 0 {
        1
    } else {
        0
    };
    assert_eq!(out.status.code(), Some(expected));
}

#[test]
fn check_table_on_the_dual_socket_fixture_blocks() {
    let root = common::fixture("dual-socket");
    let out = Command::new(BIN)
        .args(["check", "--connections", "1000000", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().next().unwrap();
    assert!(header.starts_with("CHECK") && header.contains("STATUS"));
    let status_col = header.find("STATUS").unwrap();
    let memlock = text
        .lines()
        .find(|l| l.starts_with("RLIMIT_MEMLOCK"))
        .unwrap();
    assert_eq!(
        &memlock[status_col..status_col + 6],
        "blocks",
        "aligned: {memlock}"
    );
    assert!(text.contains("2 sockets, 2 NUMA nodes, 24 CPUs (12 cores, SMT x2)"));
}

#[test]
fn apply_without_write_prints_a_diff_and_writes_nothing() {
    let root = copy_fixture("dual-socket");
    let before = list_files(root.path());
    let out = Command::new(BIN)
        .args(["apply", "--connections", "1000000", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("+ net.core.somaxconn = 16384"), "{text}");
    assert!(text.contains("+ gateway hard nofile 1004096"), "{text}");
    assert!(text.contains("dry run: nothing written"));
    assert_eq!(list_files(root.path()), before);

    // With --write the files appear, and a second dry run finds them up to date.
    let out = Command::new(BIN)
        .args(["apply", "--connections", "1000000", "--write", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.path().join("etc/sysctl.d/90-gateway.conf").exists());
    let out = Command::new(BIN)
        .args(["apply", "--connections", "1000000", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("up to date").count(), 2, "{text}");
}

#[test]
fn irq_dry_run_then_write_under_a_temp_root() {
    let root = copy_fixture("dual-socket");
    let before =
        std::fs::read_to_string(root.path().join("proc/irq/97/smp_affinity_list")).unwrap();
    let out = Command::new(BIN)
        .args(["irq", "--shards", "24", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("eth0-TxRx-7"), "{text}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("proc/irq/97/smp_affinity_list")).unwrap(),
        before
    );
    let out = Command::new(BIN)
        .args(["irq", "--shards", "24", "--write", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("proc/irq/97/smp_affinity_list")).unwrap(),
        "19\n"
    );
}
