//! One-round-trip logins against the real `gateway` binary: XEP-0388 (SASL2) with XEP-0386
//! (Bind 2) on direct TLS, on both I/O engines and two shards, so that many logins land on a
//! shard that is not the user's home and are handed off after authentication. Covered: PLAIN
//! with an inline bind and the client's next stanzas pipelined in the same write as
//! `<authenticate/>` or right after it (nothing lost across the handoff), a message between two
//! such sessions, a wrong password, SCRAM-SHA-256 with the server signature checked and XEP-0198
//! enabled inline, XEP-0198 resumption inline, a legacy (RFC 6120) login on the same server, and
//! XEP-0509 pipelining: `<authenticate/>` with the stream header and the cached config version,
//! a stale version refused without prejudice, then a login on the same stream.

#[macro_use]
mod support;

use base64::engine::general_purpose::STANDARD as Base64;
use base64::Engine as _;
use sasl::client::mechanisms::Scram;
use sasl::client::Mechanism as _;
use sasl::common::scram::Sha256;
use sasl::common::ChannelBinding;
use support::*;

const NS_SASL2: &str = "urn:xmpp:sasl:2";
const NS_BIND2: &str = "urn:xmpp:bind:0";
const PING: &str = "<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>";

/// A direct-TLS client with its stream open and the features read (SASL2 and Bind 2 offered).
fn open(server: &Server) -> Client {
    let mut c = Client::connect_direct_tls(server.tls);
    c.open_stream();
    let features = c.read_features();
    assert!(
        features.contains(&format!("<authentication xmlns='{NS_SASL2}'>")),
        "{features}"
    );
    assert!(
        features.contains(&format!("<bind xmlns='{NS_BIND2}'>")),
        "{features}"
    );
    c
}

fn authenticate_plain(node: &str, password: &str, inner: &str) -> String {
    let creds = Base64.encode(format!("\0{node}\0{password}"));
    format!(
        "<authenticate xmlns='{NS_SASL2}' mechanism='PLAIN'><initial-response>{creds}\
         </initial-response><user-agent id='{}'><software>tests</software></user-agent>\
         {inner}</authenticate>",
        unique("ua")
    )
}

fn bind2(tag: &str) -> String {
    format!("<bind xmlns='{NS_BIND2}'><tag>{tag}</tag></bind>")
}

/// Reads the SASL2 success and returns the authorization identifier.
fn expect_success(c: &mut Client) -> String {
    let success = c.expect("</success>");
    let start = success
        .find("<authorization-identifier>")
        .unwrap_or_else(|| panic!("no authorization identifier: {success}"))
        + "<authorization-identifier>".len();
    let end = success.find("</authorization-identifier>").unwrap();
    success[start..end].to_owned()
}

/// Goal: a SASL2 PLAIN login with Bind 2 and the client's presence and a ping pipelined with
/// it works whether or not the connection changes shard: the presence comes back, the ping is
/// answered, and a message reaches another SASL2 session. Method: users on both home shards,
/// each logging in three times (stanzas in the same write as `<authenticate/>`; in a second
/// write; stream header, `<authenticate/>` and stanzas in one write, as a client with cached
/// features sends them); `/metrics` shows handoffs happened.
fn plain_bind2_with_pipelined_stanzas(engine: &str) {
    let mut nodes = users_on_shard(0, 3);
    nodes.extend(users_on_shard(1, 3));
    let server = on_engine(engine).users(&nodes).start();
    for node in &nodes {
        for mode in ["same write", "second write", "with the header"] {
            let auth = authenticate_plain(node, &password_of(node), &bind2("Tests"));
            let mut c = if mode == "with the header" {
                let mut c = Client::connect_direct_tls(server.tls);
                c.send(&format!(
                    "{}{auth}<presence/>{PING}",
                    Client::stream_header(DOMAIN)
                ));
                let features = c.read_features();
                assert!(features.contains(NS_SASL2), "{features}");
                c
            } else {
                open(&server)
            };
            match mode {
                "same write" => c.send(&format!("{auth}<presence/>{PING}")),
                "second write" => {
                    c.send(&auth);
                    c.send(&format!("<presence/>{PING}"));
                }
                _ => {}
            }
            let jid = expect_success(&mut c);
            assert!(
                jid.starts_with(&format!("{node}@{DOMAIN}/Tests/")),
                "{node} {mode}: {jid}"
            );
            c.expect("<presence");
            let pong = c.expect_stanza("iq", "id='p1'");
            assert!(pong.contains("type='result'"), "{node} {mode}: {pong}");
        }
    }
    // Two SASL2 sessions on different home shards exchange a message.
    let (a, b) = (&nodes[0], &nodes[3]);
    let mut ca = open(&server);
    ca.send(&authenticate_plain(a, &password_of(a), &bind2("A")));
    expect_success(&mut ca);
    let mut cb = open(&server);
    cb.send(&format!(
        "{}<presence/>",
        authenticate_plain(b, &password_of(b), &bind2("B"))
    ));
    let b_jid = expect_success(&mut cb);
    assert!(b_jid.contains("/B/"), "{b_jid}");
    cb.expect("<presence");
    let body = unique("hello");
    ca.send(&format!(
        "<message to='{b}@{DOMAIN}' type='chat'><body>{body}</body></message>"
    ));
    let got = cb.expect_stanza("message", &body);
    assert!(got.contains(&format!("from='{a}@{DOMAIN}/A/")), "{got}");

    let handed = metric(&server, "gateway_handoffs_total", "direction=\"in\"");
    assert!(handed > 0.0, "no connection was handed off");
}

/// Goal: a wrong password gets a SASL2 failure with `<not-authorized/>` and binds nothing; the
/// same stream then logs in; a legacy login works on the same server.
fn wrong_password_then_success_and_legacy(engine: &str) {
    let node = "user1";
    let server = on_engine(engine).user(node).start();
    let mut c = open(&server);
    c.send(&authenticate_plain(node, "wrong", &bind2("T")));
    let failure = c.expect("</failure>");
    assert!(
        failure.contains(&format!("<failure xmlns='{NS_SASL2}'>"))
            && failure.contains(&format!("<not-authorized xmlns='{NS_SASL}'/>")),
        "{failure}"
    );
    assert!(!failure.contains("<success"), "{failure}");
    c.send(&format!(
        "{}{PING}",
        authenticate_plain(node, &password_of(node), &bind2("T"))
    ));
    let jid = expect_success(&mut c);
    assert!(jid.starts_with(&format!("{node}@{DOMAIN}/T/")), "{jid}");
    c.expect_stanza("iq", "id='p1'");

    let mut legacy = server.login_direct_tls(node, "legacy");
    legacy.send(PING);
    legacy.expect_stanza("iq", "id='p1'");
}

/// Goal: SCRAM-SHA-256 over SASL2: the server's challenge, the client's response, then success
/// with the server signature (checked by the `sasl` crate's client) and XEP-0198 enabled inline
/// in the bind; acks flow after it.
fn scram_sha256_with_inline_stream_management(engine: &str) {
    let node = "user1";
    let server = on_engine(engine).user(node).start();
    let mut c = open(&server);
    let mut scram =
        Scram::<Sha256>::new(node, password_of(node).as_str(), ChannelBinding::None).unwrap();
    c.send(&format!(
        "<authenticate xmlns='{NS_SASL2}' mechanism='SCRAM-SHA-256'><initial-response>{}\
         </initial-response><bind xmlns='{NS_BIND2}'><tag>Scram</tag>\
         <enable xmlns='urn:xmpp:sm:3' resume='true'/></bind></authenticate>",
        Base64.encode(scram.initial())
    ));
    let challenge = c.expect("</challenge>");
    let start = challenge.find('>').unwrap() + 1;
    let server_first = Base64
        .decode(&challenge[start..challenge.len() - "</challenge>".len()])
        .unwrap();
    c.send(&format!(
        "<response xmlns='{NS_SASL2}'>{}</response>",
        Base64.encode(scram.response(&server_first).unwrap())
    ));
    let success = c.expect("</success>");
    let start = success.find("<additional-data>").expect(&success) + "<additional-data>".len();
    let end = success.find("</additional-data>").unwrap();
    scram
        .success(&Base64.decode(&success[start..end]).unwrap())
        .expect("the server signature verifies");
    assert!(
        success.contains(&format!("{node}@{DOMAIN}/Scram/")),
        "{success}"
    );
    assert!(
        success.contains("<enabled xmlns='urn:xmpp:sm:3'"),
        "{success}"
    );
    c.send(&format!("<presence/>{PING}"));
    c.expect_stanza("iq", "id='p1'");
    c.send("<r xmlns='urn:xmpp:sm:3'/>");
    // Presence and ping were both handled under stream management.
    let ack = c.expect("<a xmlns='urn:xmpp:sm:3' h='");
    assert!(!ack.contains("<failed"), "{ack}");
}

/// Goal: XEP-0198 resumption inline in SASL2 on the real server: a session whose connection
/// was lost is taken over by `<resume/>` inside `<authenticate/>` on a new connection, with the
/// stanza the client never acknowledged sent again. Method: a ping's answer is left unacked,
/// the TCP connection dropped without closing the stream, then new connections try to resume
/// (bounded retries: the server notices the loss asynchronously).
fn inline_resumption_after_a_lost_connection(engine: &str) {
    let node = "user1";
    let server = on_engine(engine).user(node).start();
    let mut c = open(&server);
    c.send(&authenticate_plain(
        node,
        &password_of(node),
        &format!(
            "<bind xmlns='{NS_BIND2}'><tag>R</tag><enable xmlns='urn:xmpp:sm:3' resume='true'/>\
             </bind>"
        ),
    ));
    let success = c.expect("</success>");
    let id_at = success.find(" id='").expect(&success) + 5;
    let id = success[id_at..id_at + 32].to_owned();
    let jid = {
        let start = success.find("<authorization-identifier>").unwrap() + 26;
        success[start..success.find("</authorization-identifier>").unwrap()].to_owned()
    };
    c.send(PING);
    c.expect_stanza("iq", "id='p1'");
    drop(c);

    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    loop {
        let mut n = open(&server);
        n.send(&authenticate_plain(
            node,
            &password_of(node),
            &format!(
                "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>{}",
                bind2("R")
            ),
        ));
        let success = n.expect("</success>");
        if success.contains("<resumed xmlns='urn:xmpp:sm:3'") {
            assert!(
                success.contains(&format!("<authorization-identifier>{jid}<")),
                "{success}"
            );
            // The unacknowledged answer comes again.
            n.expect_stanza("iq", "id='p1'");
            return;
        }
        assert!(success.contains("<item-not-found"), "{success}");
        assert!(
            std::time::Instant::now() < deadline,
            "the lost session never became resumable"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

const NS_IAP: &str = "urn:xmpp:iap:0";

/// The XEP-0509 config version in a features block.
fn config_version(features: &str) -> String {
    let start = format!("<config-version xmlns='{NS_IAP}' value='");
    let at = features.find(&start).expect(features) + start.len();
    features[at..at + features[at..].find('\'').unwrap()].to_owned()
}

fn iap(value: &str) -> String {
    format!("<config-version xmlns='{NS_IAP}' value='{value}'/>")
}

/// `<authenticate/>` (PLAIN, Bind 2 tag `Iap`, config version `version`), presence and a ping.
fn iap_login(node: &str, version: &str) -> String {
    format!(
        "{}<presence/>{PING}",
        authenticate_plain(
            node,
            &password_of(node),
            &format!("{}{}", bind2("Iap"), iap(version))
        )
    )
}

/// Goal: XEP-0509 on the real server. A client that learnt the config version from a first
/// connection sends stream header, `<authenticate/>` with that version, presence and a ping in
/// one write and is logged in (users on both home shards: handoffs included); with a stale
/// version it gets `<aborted/>` + `<config-version-mismatch/>`, its pipelined stanzas are
/// discarded, and after three such refusals it logs in on the same stream; the refusals are
/// not counted as failed logins in `/metrics` (a wrong password on another stream is).
fn iap_pipelined_login_and_stale_version(engine: &str) {
    let mut nodes = users_on_shard(0, 1);
    nodes.extend(users_on_shard(1, 1));
    let server = on_engine(engine).users(&nodes).start();
    let version = {
        let mut first = Client::connect_direct_tls(server.tls);
        first.open_stream();
        config_version(&first.read_features())
    };
    for node in &nodes {
        let mut c = Client::connect_direct_tls(server.tls);
        c.send(&format!(
            "{}{}",
            Client::stream_header(DOMAIN),
            iap_login(node, &version)
        ));
        assert_eq!(config_version(&c.read_features()), version);
        let jid = expect_success(&mut c);
        assert!(jid.starts_with(&format!("{node}@{DOMAIN}/Iap/")), "{jid}");
        c.expect("<presence");
        c.expect_stanza("iq", "id='p1'");
    }

    let node = &nodes[1];
    let mut c = Client::connect_direct_tls(server.tls);
    c.send(&format!(
        "{}{}",
        Client::stream_header(DOMAIN),
        iap_login(node, "stale")
    ));
    let fresh = config_version(&c.read_features());
    assert_eq!(fresh, version);
    for round in 0..3 {
        if round > 0 {
            c.send(&authenticate_plain(node, &password_of(node), &iap("older")));
        }
        let failure = c.expect("</failure>");
        assert!(
            failure.contains(&format!(
                "<failure xmlns='{NS_SASL2}'><aborted xmlns='{NS_SASL}'/>"
            )) && failure.contains(&format!("<config-version-mismatch xmlns='{NS_IAP}'/>")),
            "{failure}"
        );
    }
    c.send(&iap_login(node, &fresh));
    expect_success(&mut c);
    c.expect("<presence");
    // The ping pipelined behind the refused authenticate was discarded: only this one answers.
    let pong = c.expect_stanza("iq", "id='p1'");
    assert!(pong.contains("type='result'"), "{pong}");

    // A wrong password is a failed login; the refusals above were not.
    let mut w = open(&server);
    w.send(&authenticate_plain(node, "wrong", ""));
    w.expect("<not-authorized");
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while metric(&server, "gateway_auth_total", "result=\"success\"") < 3.0
        || metric(&server, "gateway_auth_total", "result=\"failure\"") < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "auth counters never updated"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        metric(&server, "gateway_auth_total", "result=\"failure\""),
        1.0
    );
}

/// A server builder on I/O engine `engine`.
fn on_engine(engine: &str) -> ServerBuilder {
    ServerBuilder::new().arg("--io-engine").arg(engine)
}

on_both_engines!(
    plain_bind2_with_pipelined_stanzas,
    wrong_password_then_success_and_legacy,
    scram_sha256_with_inline_stream_management,
    inline_resumption_after_a_lost_connection,
    iap_pipelined_login_and_stale_version,
);
