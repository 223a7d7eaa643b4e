//! `apply` against a temporary root: exact file contents, idempotence, and dry runs.

mod common;

use common::{copy_fixture, list_files};
use tuning::apply::{self, LIMITS_FILE, SYSCTL_FILE};
use tuning::{Host, Role, Target};

const SYSCTL_EXPECTED: &str = "\
# Written by `tuning apply --connections 1000000 --role server`: rerun it rather than editing.
# Loaded at boot by systemd-sysctl; now with `sysctl -p /etc/sysctl.d/90-gateway.conf`.
net.core.somaxconn = 16384
net.ipv4.tcp_max_syn_backlog = 16384
net.core.netdev_max_backlog = 16384
net.ipv4.tcp_rmem = 4096 16384 6291456
net.netfilter.nf_conntrack_max = 1250000
";

const LIMITS_EXPECTED: &str = "\
# Written by `tuning apply --connections 1000000 --role server`: rerun it rather than editing.
# pam_limits applies this at login; gateway.service sets LimitNOFILE= and LimitMEMLOCK= itself.
# The nofile hard limit must stay <= fs.nr_open or logins fail.
gateway soft nofile 1004096
gateway hard nofile 1004096
gateway soft memlock unlimited
gateway hard memlock unlimited
";

#[test]
fn writes_exact_files_then_finds_nothing_to_do() {
    let root = copy_fixture("dual-socket");
    let host = Host::new(root.path());
    let target = Target::new(1_000_000);
    let plan = apply::plan(&host, &target, "gateway");
    assert!(!plan.is_noop());
    let diff = plan.diff(&host);
    assert!(diff.contains("+ net.core.somaxconn = 16384"), "{diff}");
    assert!(diff.contains("net.core.somaxconn: 4096 -> 16384"), "{diff}");
    // tuning runs as uid 1000 in the fixture, but the root is not "/": writing is allowed.
    let applied = apply::write(&host, &plan).unwrap();
    assert_eq!(applied.written.len(), 2);
    assert!(!applied.loaded, "sysctl -p only on the live host");
    assert_eq!(host.read(SYSCTL_FILE).unwrap(), SYSCTL_EXPECTED);
    assert_eq!(host.read(LIMITS_FILE).unwrap(), LIMITS_EXPECTED);
    assert!(plan
        .notes
        .iter()
        .any(|n| n.contains("thash_entries=1048576")));
    assert!(plan.notes.iter().any(|n| n.contains("hashsize=524288")));

    // Second run: same files, nothing written.
    let again = apply::plan(&host, &target, "gateway");
    assert!(again.is_noop());
    assert_eq!(again.sysctl_text, SYSCTL_EXPECTED);
    let diff = again.diff(&host);
    assert!(!diff.contains("\n+ ") && !diff.contains("\n- "), "{diff}");
    assert!(diff.contains("up to date"));
    let applied = apply::write(&host, &again).unwrap();
    assert!(applied.written.is_empty());
    assert_eq!(applied.unchanged.len(), 2);

    // As if the kernel had loaded the file: live values now match, the file stays the same.
    for (key, value) in [
        ("net/core/somaxconn", "16384"),
        ("net/ipv4/tcp_max_syn_backlog", "16384"),
        ("net/core/netdev_max_backlog", "16384"),
        ("net/ipv4/tcp_rmem", "4096\t16384\t6291456"),
        ("net/netfilter/nf_conntrack_max", "1250000"),
    ] {
        std::fs::write(root.path().join("proc/sys").join(key), format!("{value}\n")).unwrap();
    }
    let loaded = apply::plan(&host, &target, "gateway");
    assert!(loaded.is_noop());
    assert_eq!(loaded.sysctl_text, SYSCTL_EXPECTED);
    assert!(!loaded.diff(&host).contains("->"));
}

#[test]
fn bench_role_widens_ports_and_a_bigger_target_rewrites() {
    let root = copy_fixture("this-box");
    let host = Host::new(root.path());
    let bench = Target {
        role: Role::Bench,
        ..Target::new(2_000_000)
    };
    let plan = apply::plan(&host, &bench, "load");
    assert!(plan
        .sysctl_text
        .contains("net.ipv4.ip_local_port_range = 1024 65535\n"));
    assert!(plan.sysctl_text.contains("fs.nr_open = 2004096\n"));
    assert!(plan.limits_text.contains("load hard nofile 2004096\n"));
    apply::write(&host, &plan).unwrap();
    // The server at 1000 sessions needs nothing but keeps what the file already sets.
    let small = apply::plan(&host, &Target::new(1_000), "load");
    assert!(small.sysctl_text.contains("fs.nr_open = 1048576\n"));
    assert!(
        !small.is_noop(),
        "the header and limits change with the target"
    );
}

#[test]
fn dry_run_writes_nothing() {
    let root = copy_fixture("dual-socket");
    let before = list_files(root.path());
    let host = Host::new(root.path());
    let plan = apply::plan(&host, &Target::new(1_000_000), "gateway");
    let _ = plan.diff(&host);
    assert_eq!(list_files(root.path()), before);
}

#[test]
fn writing_under_slash_needs_root() {
    let refused = apply::root_allowed(true, Some(1000), "tuning apply --write").unwrap_err();
    let apply::RootCheck::NotRoot(err) = refused else {
        panic!("expected NotRoot");
    };
    assert_eq!(err.as_str(), "not_root");
    assert_eq!(
        err.to_string(),
        "tuning apply --write needs root (effective uid 1000): rerun with sudo, or pass --root \
         DIR to write under another directory"
    );
    assert!(apply::root_allowed(true, Some(0), "x").is_ok());
    assert!(apply::root_allowed(false, Some(1000), "x").is_ok());
    assert!(apply::root_allowed(true, None, "x").is_err());
}
