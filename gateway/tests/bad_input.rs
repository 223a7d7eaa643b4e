//! Bad input against the real `gateway` binary: each test provokes one error and asserts the exact
//! stream or SASL error element, then proves that OTHER sessions, already logged in on both
//! shards (one on the offender's own home shard), are unaffected.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// A running server with two witness sessions (one per shard) and a user for the offender whose
/// home shard is the same as `same`'s.
struct Fixture {
    server: Server,
    /// The offending user (home shard 1).
    bad: String,
    /// Witness on the offender's home shard.
    same: Client,
    /// Witness on the other shard.
    other: Client,
}

fn fixture(builder: ServerBuilder) -> Fixture {
    let s1 = users_on_shard(1, 2);
    let s0 = users_on_shard(0, 1);
    assert_ne!(home_shard(&s1[1]), home_shard(&s0[0]));
    let server = builder.users(&s1).users(&s0).start();
    let same = login_retrying(&server, &s1[1], false);
    let other = login_retrying(&server, &s0[0], true);
    Fixture {
        bad: s1[0].clone(),
        same,
        other,
        server,
    }
}

/// Logs a witness in, retrying twice: with `--unauthenticated-timeout-seconds 1` a login on a
/// loaded machine may itself run into the timeout, which is not what a test here is about.
fn login_retrying(server: &Server, node: &str, direct_tls: bool) -> Client {
    let mut attempt = 1;
    loop {
        let login = std::panic::AssertUnwindSafe(|| {
            if direct_tls {
                server.login_direct_tls(node, "witness")
            } else {
                server.login(node, "witness")
            }
        });
        match std::panic::catch_unwind(login) {
            Ok(client) => return client,
            Err(_) if attempt < 3 => {
                eprintln!("login of witness {node} failed (attempt {attempt}); retrying");
                attempt += 1;
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Fixture {
    fn assert_witnesses_alive(&mut self) {
        self.same.assert_alive();
        self.other.assert_alive();
    }
}

#[test]
fn malformed_xml_gets_not_well_formed() {
    // Goal: malformed XML ends only the offending stream, with <not-well-formed/>.
    // Method: a bound session sends a mismatched end tag; separately an unauthenticated stream
    // sends garbage after its header. Both must get the stream error and be closed; the witness
    // sessions on both shards must still answer a ping and receive a message to themselves.
    let mut f = fixture(ServerBuilder::new());
    let mut bad = f.server.login(&f.bad, "r");
    let jid = bad.jid.clone().unwrap();
    bad.send(&format!("<message to='{jid}'><body>hi</message>"));
    bad.expect_stream_error("not-well-formed");

    let mut pre = Client::connect(f.server.c2s);
    pre.open_stream();
    pre.read_features();
    pre.send("<a b='1' b='2'/>");
    pre.expect_stream_error("not-well-formed");

    f.assert_witnesses_alive();
}

#[test]
fn text_with_the_cdata_end_never_reaches_a_recipient() {
    // Goal: `]]>` in a message's text (not well-formed: it only ends a CDATA section) ends the
    // sender's stream instead of being passed on, where the recipient's XML parser would end
    // its stream. Method: a bound session sends it to the witnesses on both shards; it gets
    // <not-well-formed/>, and the witnesses receive nothing from it and still work.
    let mut f = fixture(ServerBuilder::new());
    let mut bad = f.server.login(&f.bad, "r");
    let targets = [f.same.jid.clone().unwrap(), f.other.jid.clone().unwrap()];
    for to in &targets {
        bad.send(&format!(
            "<message to='{to}' type='chat' id='cdata-end'><body>a ]]> b</body></message>"
        ));
    }
    bad.expect_stream_error("not-well-formed");
    for witness in [&mut f.same, &mut f.other] {
        assert!(
            witness
                .try_expect("cdata-end", Duration::from_millis(300))
                .is_err(),
            "the message reached a recipient"
        );
    }
    f.assert_witnesses_alive();
}

#[test]
fn oversized_stanza_gets_policy_violation() {
    // Goal: a stanza larger than --stanza-bytes-max gets <policy-violation/>, and one under the
    // limit does not. Method: limit 4096; a bound session sends itself a ~3000-byte message (must
    // arrive), then a ~6000-byte one (must end the stream); witnesses are checked afterwards.
    let mut f = fixture(ServerBuilder::new().arg("--stanza-bytes-max").arg("4096"));
    let mut bad = f.server.login(&f.bad, "r");
    let jid = bad.jid.clone().unwrap();
    let small = format!("small-{}", "s".repeat(3000));
    bad.send(&format!(
        "<message to='{jid}' type='chat'><body>{small}</body></message>"
    ));
    let got = bad.expect_stanza("message", &small);
    assert!(
        !is_type(&got, "error"),
        "a stanza under the limit bounced: {got}"
    );

    let big = "b".repeat(6000);
    // The server may close before reading all of it; a failed write is not the point here.
    let _ = bad.try_send(
        format!("<message to='{jid}' type='chat'><body>{big}</body></message>").as_bytes(),
    );
    bad.expect_stream_error("policy-violation");
    f.assert_witnesses_alive();
}

#[test]
fn restricted_xml_is_refused() {
    // Goal: DTDs, comments, processing instructions and entity references other than the five
    // predefined ones get <restricted-xml/> (RFC 6120 §11.1), while predefined entities work.
    // Method: a bound session first sends itself a message using &amp; and &lt; (must arrive
    // intact); then one fresh connection per construct, each expecting the stream error.
    let mut f = fixture(ServerBuilder::new());

    let mut ok = f.server.login(&f.bad, "control");
    let jid = ok.jid.clone().unwrap();
    let marker = unique("escaped");
    ok.send(&format!(
        "<message to='{jid}' type='chat'><body>{marker} a &amp; b &lt; c</body></message>"
    ));
    let got = ok.expect_stanza("message", &marker);
    assert!(
        got.contains("&amp;") && got.contains("&lt;"),
        "predefined entities mangled: {got}"
    );

    // A DTD before the stream header.
    let mut pre = Client::connect(f.server.c2s);
    pre.send(&format!(
        "<?xml version='1.0'?><!DOCTYPE stream:stream [<!ENTITY x 'y'>]>{}",
        Client::stream_header(DOMAIN).trim_start_matches("<?xml version='1.0'?>")
    ));
    pre.expect_stream_error("restricted-xml");

    let cases = [
        (
            "comment",
            "<message to='JID'><!-- hello --><body>x</body></message>",
        ),
        (
            "processing instruction",
            "<?foo bar?><message to='JID'><body>x</body></message>",
        ),
        (
            "entity reference",
            "<message to='JID'><body>&foo;</body></message>",
        ),
        (
            "DTD after the header",
            "<!DOCTYPE message><message to='JID'><body>x</body></message>",
        ),
    ];
    for (what, xml) in cases {
        let mut bad = f.server.login(&f.bad, &unique("r"));
        let jid = bad.jid.clone().unwrap();
        bad.send(&xml.replace("JID", &jid));
        let text = bad.expect_stream_error("restricted-xml");
        assert!(
            !text.contains("<body>x</body>"),
            "{what}: the stanza was delivered: {text}"
        );
    }

    ok.assert_alive();
    f.assert_witnesses_alive();
}

#[test]
fn wrong_password_gets_not_authorized() {
    // Goal: a wrong password or unknown user gets the SASL failure <not-authorized/>, the stream
    // stays usable for a retry (RFC 6120 §6.4.5), and nothing else is affected.
    // Method: PLAIN over STARTTLS with a wrong password, then with an unknown user, then the
    // right password on the same stream, which must bind and work.
    let mut f = fixture(ServerBuilder::new());
    let mut c = Client::connect_starttls(f.server.c2s);
    for (user, pw) in [
        (f.bad.as_str(), "wrong-password"),
        ("nosuchuser", "whatever"),
    ] {
        let answer = c
            .auth_plain(user, pw)
            .expect_err("authentication must fail");
        assert!(
            answer.contains("<failure"),
            "{user}: not a SASL failure: {answer}"
        );
        assert!(
            answer.contains(NS_SASL),
            "{user}: failure not in the SASL namespace: {answer}"
        );
        assert!(
            answer.contains("<not-authorized"),
            "{user}: expected <not-authorized/>: {answer}"
        );
    }
    c.auth_plain(&f.bad, &password_of(&f.bad))
        .expect("retry with the right password");
    c.bind("r");
    c.assert_alive();
    f.assert_witnesses_alive();
}

#[test]
fn plain_without_tls_is_refused() {
    // Goal: without --allow-plaintext, the c2s port requires TLS: PLAIN is not offered before
    // STARTTLS and forcing it does not authenticate. Method: read the pre-TLS features (starttls
    // must be there, PLAIN must not), then send <auth mechanism='PLAIN'> with valid credentials
    // anyway and assert no <success/>; then try to bind and assert no bind result.
    let mut f = fixture(ServerBuilder::new());
    let mut c = Client::connect(f.server.c2s);
    c.open_stream();
    let features = c.read_features();
    assert!(
        features.contains("<starttls"),
        "STARTTLS not offered: {features}"
    );
    assert!(
        features.contains("<required"),
        "STARTTLS not marked <required/> although TLS is required: {features}"
    );
    let mechs = Client::mechanisms(&features);
    assert!(
        !mechs.iter().any(|m| m.eq_ignore_ascii_case("PLAIN")),
        "PLAIN offered without TLS: {features}"
    );

    let answer = c.auth_plain(&f.bad, &password_of(&f.bad));
    match answer {
        Ok(()) => panic!("PLAIN authentication succeeded without TLS"),
        Err(text) => {
            assert!(!text.contains("<success"), "{text}");
            let refused = [
                "<encryption-required",
                "<policy-violation",
                "<invalid-mechanism",
                "<not-authorized",
                "<failure",
            ];
            assert!(
                refused.iter().any(|r| text.contains(r)),
                "unexpected answer to PLAIN without TLS: {text}"
            );
        }
    }
    if !c.is_closed() {
        let id = unique("bind");
        c.send(&format!(
            "<iq type='set' id='{id}'><bind xmlns='{NS_BIND}'><resource>x</resource></bind></iq>"
        ));
        if let Ok(iq) = c.try_expect_stanza("iq", &id, Duration::from_secs(2)) {
            assert!(
                !is_type(&iq, "result"),
                "bound without authentication: {iq}"
            );
        }
    }
    f.assert_witnesses_alive();
}

#[test]
fn plain_allowed_with_allow_plaintext() {
    // Goal: --allow-plaintext lets a client authenticate with PLAIN without TLS (the loopback
    // benchmark mode). Method: log in over plain TCP, bind, ping and message self.
    let user = users_on_shard(0, 1).remove(0);
    let server = ServerBuilder::new().user(&user).allow_plaintext().start();
    let mut c = Client::connect(server.c2s);
    c.open_stream();
    let features = c.read_features();
    assert!(
        Client::mechanisms(&features).iter().any(|m| m == "PLAIN"),
        "PLAIN not offered: {features}"
    );
    c.auth_plain(&user, &password_of(&user))
        .expect("plaintext PLAIN login");
    c.bind("r");
    c.assert_alive();
}

#[test]
fn bind_conflict_closes_old_stream() {
    // Goal: binding a full JID that is already online ends the OLD stream with <conflict/> and
    // the new one works. Method: log in twice as the same user with the same resource, the
    // second time over direct TLS; expect the stream error on the first client.
    let mut f = fixture(ServerBuilder::new());
    let mut old = f.server.login(&f.bad, "same");
    let mut new = f.server.login_direct_tls(&f.bad, "same");
    old.expect_stream_error("conflict");
    assert_eq!(
        new.jid.as_deref(),
        Some(format!("{}@{DOMAIN}/same", f.bad).as_str())
    );
    new.assert_alive();
    f.assert_witnesses_alive();
}

#[test]
fn wrong_stream_namespace_gets_invalid_namespace() {
    // Goal: a stream header whose stream namespace is wrong gets <invalid-namespace/>.
    // Method: open a stream with xmlns:stream bound to a misspelt namespace, on the c2s port and
    // on the direct-TLS port.
    let mut f = fixture(ServerBuilder::new());
    let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
                  xmlns:stream='http://etherx.jabber.org/streamz' to='localhost' version='1.0'>";
    let mut c = Client::connect(f.server.c2s);
    c.send(header);
    c.expect_stream_error("invalid-namespace");
    let mut t = Client::connect_direct_tls(f.server.tls);
    t.send(header);
    t.expect_stream_error("invalid-namespace");
    f.assert_witnesses_alive();
}

#[test]
fn wrong_to_gets_host_unknown() {
    // Goal: a stream addressed to a domain the server does not serve gets <host-unknown/>.
    // Method: to='example.org' on the c2s port and on the direct-TLS port.
    let mut f = fixture(ServerBuilder::new());
    let mut c = Client::connect(f.server.c2s);
    c.send(&Client::stream_header("example.org"));
    c.expect_stream_error("host-unknown");
    let mut t = Client::connect_direct_tls(f.server.tls);
    t.send(&Client::stream_header("example.org"));
    t.expect_stream_error("host-unknown");
    f.assert_witnesses_alive();
}

#[test]
fn unauthenticated_stream_times_out() {
    // Goal: a connection that has not authenticated and bound within
    // --unauthenticated-timeout-seconds gets <connection-timeout/>, while bound sessions older
    // than that are kept. Method: timeout 1 s; the witnesses log in first; a raw connection opens
    // a stream and then idles; it must get the error after about 1 s (not at once, not after
    // 10 s). A connection that sends nothing at all must be closed too. Then the witnesses,
    // now older than the timeout, must still work.
    let mut f = fixture(
        ServerBuilder::new()
            .arg("--unauthenticated-timeout-seconds")
            .arg("1"),
    );
    let start = Instant::now();
    let mut idle = Client::connect(f.server.c2s);
    let mut silent = Client::connect(f.server.c2s);
    idle.open_stream();
    idle.read_features();
    idle.expect_stream_error("connection-timeout");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800),
        "timed out too early: {elapsed:?}"
    );
    silent.expect_eof();
    std::thread::sleep(Duration::from_millis(500));
    f.assert_witnesses_alive();
}

#[test]
fn sigterm_closes_streams_and_exits_zero() {
    // Goal: SIGTERM closes every stream with </stream:stream> and the process exits 0 within the
    // shutdown timeout. Method: sessions on both shards plus one unauthenticated stream; send
    // SIGTERM; each client must read </stream:stream> then EOF; the exit status must be 0 and
    // come within --shutdown-timeout-seconds (5) plus slack.
    let mut f = fixture(
        ServerBuilder::new()
            .arg("--shutdown-timeout-seconds")
            .arg("5"),
    );
    let mut pre = Client::connect(f.server.c2s);
    pre.open_stream();
    pre.read_features();
    let start = Instant::now();
    f.server.signal(libc::SIGTERM);
    f.same.expect_close();
    f.other.expect_close();
    pre.expect_close();
    let (status, _) = f.server.wait_exit(Duration::from_secs(15));
    let elapsed = start.elapsed();
    assert!(status.success(), "exit status {status}\n{}", f.server.log());
    assert!(
        elapsed < Duration::from_secs(8),
        "shutdown took {elapsed:?}"
    );
    assert!(
        f.server.log().contains("gateway ready"),
        "no `gateway ready` line in the log"
    );
}

#[test]
fn config_errors_name_the_key() {
    // Goal: a bad --config file makes the process exit non-zero with one line naming the key.
    // Method: for an unknown key and two bad values, write the file, run `serve` with free ports,
    // and check the exit status and stderr.
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("domian = 'localhost'", "domian"),
        ("shards = 0", "shards"),
        ("c2s_addr = 'nowhere'", "c2s_addr"),
    ];
    for (toml, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        let data = dir.path().join("data");
        let [c2s, tls, admin] = free_ports();
        let out = run_gateway(
            &[
                "--config",
                path.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "serve",
                "--no-pin",
                "--c2s-addr",
                &format!("127.0.0.1:{c2s}"),
                "--tls-addr",
                &format!("127.0.0.1:{tls}"),
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
            ],
            None,
            Duration::from_secs(20),
        );
        assert!(
            !out.timed_out,
            "{toml:?}: the server started anyway: {out:?}"
        );
        assert!(!out.success(), "{toml:?}: exit status 0: {out:?}");
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{toml:?}: expected one line on stderr, got {:?}",
            out.stderr
        );
        assert!(
            lines[0].contains(key),
            "{toml:?}: the line does not name `{key}`: {:?}",
            lines[0]
        );
        assert!(!out.stderr.contains("panicked"), "{toml:?}: {}", out.stderr);
    }
}

#[test]
fn user_commands_refuse_a_running_server_and_work_when_stopped() {
    // Goal: `user add` while the server runs fails with a clear message and harms nothing; with
    // the server stopped, add (password from stdin), list and del work, and the added user can
    // log in after a restart. Method: run the CLI against the running server's data dir, check
    // status and stderr, check the witnesses; stop with SIGTERM (exit 0); run the commands again.
    let mut f = fixture(ServerBuilder::new());
    let dir = f.server.data_dir.to_str().unwrap().to_owned();
    let it = SCRAM_ITERATIONS;
    let out = run_gateway(
        &[
            "--data-dir",
            &dir,
            "--scram-iterations",
            it,
            "user",
            "add",
            "newbie",
            "--password",
            "x",
        ],
        None,
        Duration::from_secs(30),
    );
    assert!(
        !out.timed_out && !out.success(),
        "user add succeeded while the server runs: {out:?}"
    );
    let msg = out.stderr.to_lowercase();
    assert!(!msg.contains("panicked"), "{}", out.stderr);
    assert!(
        ["running", "lock", "stop", "in use", "busy"]
            .iter()
            .any(|w| msg.contains(w)),
        "unclear message: {:?}",
        out.stderr
    );
    f.assert_witnesses_alive();

    f.server.stop();
    let out = run_gateway(
        &[
            "--data-dir",
            &dir,
            "--scram-iterations",
            it,
            "user",
            "add",
            "newbie",
        ],
        Some("from-stdin\n"),
        Duration::from_secs(30),
    );
    assert!(out.success(), "user add (stdin password): {out:?}");
    let out = run_gateway(
        &["--data-dir", &dir, "user", "del", &f.bad],
        None,
        Duration::from_secs(30),
    );
    assert!(out.success(), "user del: {out:?}");
    let out = run_gateway(
        &["--data-dir", &dir, "user", "list"],
        None,
        Duration::from_secs(30),
    );
    assert!(out.success(), "user list: {out:?}");
    let names: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert!(names.contains(&"newbie"), "{names:?}");
    assert!(
        !names.contains(&f.bad.as_str()),
        "deleted user still listed: {names:?}"
    );

    f.server.restart();
    let mut c = Client::connect_starttls(f.server.c2s);
    c.auth_plain("newbie", "from-stdin")
        .expect("login with the password read from stdin");
    c.bind("r");
    c.assert_alive();
    let mut gone = Client::connect_starttls(f.server.c2s);
    let answer = gone
        .auth_plain(&f.bad, &password_of(&f.bad))
        .expect_err("deleted user logged in");
    assert!(answer.contains("<not-authorized"), "{answer}");
}
