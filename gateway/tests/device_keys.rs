//! Goal: device keys (issue 4) work end to end as a user runs them: `gateway user add-device-key`
//! prints a key once, the key logs in with SASL PLAIN over direct TLS, a wrong key fails exactly
//! like a wrong password, the password keeps working, and the key never shows in the log even at
//! trace level. Method: the real binary, stopped for the CLI, restarted to serve.

mod support;

use std::time::Duration;

use support::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

fn add_device_key(server: &Server, node: &str) -> CmdOutput {
    run_gateway(
        &[
            "--data-dir",
            server.data_dir.to_str().unwrap(),
            "user",
            "add-device-key",
            node,
        ],
        None,
        CLI_TIMEOUT,
    )
}

fn try_login(server: &Server, node: &str, secret: &str) -> Result<Client, String> {
    let mut c = Client::connect_direct_tls(server.tls);
    c.open_stream();
    c.read_features();
    c.auth_plain(node, secret)?;
    Ok(c)
}

#[test]
fn a_device_key_logs_in_and_is_never_logged() {
    let node = unique("dev");
    let mut server = ServerBuilder::new().user(&node).start();
    server.stop();
    let out = add_device_key(&server, &node);
    assert!(out.success(), "add-device-key: {out:?}");
    let key = out.stdout.trim().to_owned();
    assert!(key.starts_with("dk-") && key.len() == 67, "key {key:?}");
    // A second key is a different one; both are held.
    let second = add_device_key(&server, &node);
    assert!(second.success(), "second add-device-key: {second:?}");
    let second = second.stdout.trim().to_owned();
    assert_ne!(key, second);
    let unknown = add_device_key(&server, "nobody-here");
    assert!(
        !unknown.success(),
        "a key for a missing account: {unknown:?}"
    );
    assert!(unknown.stderr.contains("no such user"), "{unknown:?}");

    // The most verbose log level, so any line with the key would be written.
    server.restart();
    let admin = server.admin.to_string();
    let knob = run_gateway(
        &["knob", "--admin-addr", &admin, "log_level", "trace"],
        None,
        CLI_TIMEOUT,
    );
    assert!(knob.success(), "knob log_level trace: {knob:?}");

    let mut c = try_login(&server, &node, &key)
        .unwrap_or_else(|e| panic!("device key login: {e}\n{}", server.log()));
    c.bind("phone");
    try_login(&server, &node, &second).expect("second device key");
    try_login(&server, &node, &password_of(&node)).expect("the password still works");

    let mut wrong_key = key.clone();
    let last = wrong_key.pop().unwrap();
    wrong_key.push(if last == '0' { '1' } else { '0' });
    let bad_key = try_login(&server, &node, &wrong_key)
        .err()
        .expect("wrong key fails");
    let bad_password = try_login(&server, &node, "not-the-password")
        .err()
        .expect("wrong password fails");
    assert!(bad_key.contains("not-authorized"), "{bad_key}");
    assert!(bad_password.contains("not-authorized"), "{bad_password}");
    // Same answer apart from nothing: a wrong key tells no more than a wrong password.
    assert_eq!(bad_key, bad_password);

    drop(c);
    server.stop();
    let log = server.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level took: {log}"
    );
    for secret in [&key, &second, &wrong_key] {
        assert!(!log.contains(secret.as_str()), "a device key in the log");
        // Nor the hex part alone, nor the base64 of the SASL message that carries it.
        assert!(!log.contains(&secret[3..]), "a device key's hex in the log");
    }
    let sasl = base64_plain(&node, &key);
    assert!(!log.contains(&sasl), "the SASL PLAIN message in the log");
}

fn base64_plain(node: &str, secret: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{node}\0{secret}"))
}
