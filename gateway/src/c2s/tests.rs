use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::sasl::client::mechanisms::Scram;
use ::sasl::client::Mechanism;
use ::sasl::common::scram::{ScramProvider, Sha1, Sha256};
use ::sasl::common::ChannelBinding;
use base64::engine::general_purpose::STANDARD as Base64;
use base64::Engine;
use router::credentials::{
    device_key_hash, new_device_key, pbkdf2_rounds_on_this_thread, Credentials,
};
use router::BindError;
use shared::stanza::Stanza;

use super::*;

const DOMAIN: &str = "example.com";
const HEADER: &str = "<?xml version='1.0'?><stream:stream to='example.com' version='1.0' \
                      xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
/// RFC 6120 mechanisms, then the XEP-0388 feature with Bind 2 (XEP-0386) and XEP-0198 inline.
const MECHS_ALL: &str = "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism>\
                         <mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms>\
                         <authentication xmlns='urn:xmpp:sasl:2'><mechanism>SCRAM-SHA-256</mechanism>\
                         <mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism><inline>\
                         <sm xmlns='urn:xmpp:sm:3'/><bind xmlns='urn:xmpp:bind:0'><inline>\
                         <feature var='urn:xmpp:sm:3'/></inline></bind></inline></authentication>";
const MECHS_SCRAM: &str =
    "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism>\
                           <mechanism>SCRAM-SHA-1</mechanism></mechanisms>";
const BIND_FEATURES: &str = "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
                             <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
                             <sm xmlns='urn:xmpp:sm:3'/></stream:features>";
const NOT_AUTHORIZED: &str =
    "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>";

/// The server's configured PBKDF2 count in these tests, and alice's: not the 4,096 default, as
/// the peers scripts run.
const SCRAM_ITERATIONS: u32 = 64;

fn alice_credentials() -> Credentials {
    static CREDS: OnceLock<Credentials> = OnceLock::new();
    CREDS
        .get_or_init(|| Credentials::derive("pw", SCRAM_ITERATIONS))
        .clone()
}

#[derive(Default)]
struct Mock {
    users: HashMap<String, Credentials>,
    lookups: Vec<String>,
    bound: Vec<(String, Option<String>)>,
    taken: Vec<String>,
    full: bool,
    stanzas: Vec<Stanza>,
    sm_enabled: bool,
    /// Of the stanzas passed on, how many are settled (the rest are in flight).
    settled: u64,
    acked: Vec<u64>,
    /// A detached session the next `resume` may take: (id, state, full JID).
    detached: Option<(String, SmState, String)>,
    /// The client's address has used up its failed logins.
    refuse: bool,
    /// Logins that failed on their credentials, as the driver was told.
    failed: u32,
}

impl Services for Mock {
    fn credentials(&mut self, node: &str) -> Option<Credentials> {
        self.lookups.push(node.to_owned());
        self.users.get(node).cloned()
    }
    fn bind(&mut self, node: &str, resource: Option<&str>) -> Result<String, BindError> {
        self.bound
            .push((node.to_owned(), resource.map(str::to_owned)));
        if self.full {
            return Err(BindError::TooManySessions);
        }
        match resource {
            Some("bad") => Err(BindError::BadResource),
            // Conflict: the server picks another resource (RFC 6120 §7.7.2.2).
            Some(r) if self.taken.iter().any(|t| t == r) => Ok(format!("{node}@{DOMAIN}/{r}-2")),
            Some(r) => Ok(format!("{node}@{DOMAIN}/{r}")),
            None => Ok(format!("{node}@{DOMAIN}/generated")),
        }
    }
    fn stanza(&mut self, stanza: Stanza) {
        self.stanzas.push(stanza);
    }
    fn sm_enabled(&mut self) {
        self.sm_enabled = true;
    }
    fn received(&mut self) -> u64 {
        self.stanzas.len() as u64
    }
    fn settled(&mut self) -> u64 {
        self.settled.min(self.stanzas.len() as u64)
    }
    fn acked(&mut self, seqs: &[u64]) {
        self.acked.extend_from_slice(seqs);
    }
    fn auth_refused(&mut self) -> bool {
        self.refuse
    }
    fn auth_failed(&mut self) {
        self.failed += 1;
    }
    fn resume(&mut self, node: &str, previd: &str) -> Option<(SmState, String)> {
        match self.detached.take() {
            Some((id, sm, full)) if id == previd && full.starts_with(&format!("{node}@")) => {
                Some((sm, full))
            }
            other => {
                self.detached = other;
                None
            }
        }
    }
}

fn config(starttls_offered: bool, allow_plaintext: bool) -> Arc<C2sConfig> {
    Arc::new(C2sConfig {
        domain: DOMAIN.to_owned(),
        starttls_offered,
        allow_plaintext,
        scram_iterations: SCRAM_ITERATIONS,
        stanza_bytes_max: 4096,
        unauthenticated_timeout: Duration::from_secs(30),
        sm_resume_timeout: Duration::from_secs(300),
        random: crate::c2s::fill_random,
    })
}

struct Client {
    c2s: C2s,
    svc: Mock,
    now: Instant,
}

impl Client {
    fn new(security: Security, config: Arc<C2sConfig>) -> Client {
        let now = Instant::now();
        let mut svc = Mock::default();
        svc.users.insert("alice".to_owned(), alice_credentials());
        Client {
            c2s: C2s::new(config, security, now),
            svc,
            now,
        }
    }
    fn tls() -> Client {
        Client::new(Security::Tls, config(false, false))
    }
    fn send(&mut self, data: &str) -> (Step, String) {
        let mut out = Vec::new();
        let step = self
            .c2s
            .handle_bytes(data.as_bytes(), &mut self.svc, &mut out, self.now);
        (step, String::from_utf8(out).unwrap())
    }
    /// Sends and expects `Continue`.
    fn ok(&mut self, data: &str) -> String {
        let (step, out) = self.send(data);
        assert_eq!(step, Step::Continue, "output: {out}");
        out
    }
    fn login_plain(&mut self) {
        self.ok(HEADER);
        let (step, out) = self.send(&plain_auth("", "alice", "pw"));
        assert_eq!(out, "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
        assert_eq!(
            step,
            Step::Authenticated {
                node: "alice".to_owned()
            }
        );
    }
    fn bind(&mut self, resource: &str) -> String {
        assert!(self.ok(HEADER).ends_with(BIND_FEATURES));
        self.ok(&format!(
            "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ))
    }
}

fn plain_auth(authzid: &str, user: &str, password: &str) -> String {
    let payload = Base64.encode(format!("{authzid}\0{user}\0{password}"));
    format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>")
}

fn stream_error(condition: &str) -> String {
    format!(
        "<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>"
    )
}

/// Our stream header, with the random id replaced.
fn server_header() -> &'static str {
    "<?xml version='1.0'?><stream:stream from='example.com' id='ID' version='1.0' xml:lang='en' \
     xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
}

fn mask_ids(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find(" id='") {
        out.push_str(&rest[..at + 5]);
        rest = &rest[at + 5..];
        let end = rest.find('\'').unwrap();
        let id = &rest[..end];
        // Only the 32-hex stream ids are random.
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            out.push_str("ID");
        } else {
            out.push_str(id);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The XEP-0509 feature with its value replaced by `mask_config_version`.
const IAP_MASKED: &str = "<config-version xmlns='urn:xmpp:iap:0' value='V'/>";
const IAP_START: &str = "<config-version xmlns='urn:xmpp:iap:0' value='";

/// The XEP-0509 config version in `out`, if any.
fn config_version(out: &str) -> Option<&str> {
    let start = out.find(IAP_START)? + IAP_START.len();
    let len = out[start..].find('\'')?;
    Some(&out[start..start + len])
}

fn mask_config_version(out: &str) -> String {
    match config_version(out) {
        Some(v) => out.replacen(&format!("{IAP_START}{v}'"), &format!("{IAP_START}V'"), 1),
        None => out.to_owned(),
    }
}

fn challenge_payload(out: &str) -> Vec<u8> {
    let start = out
        .find("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
        .expect(out)
        + 52;
    let end = out.find("</challenge>").unwrap();
    Base64.decode(&out[start..end]).unwrap()
}

fn success_payload(out: &str) -> Vec<u8> {
    let start = out
        .find("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
        .expect(out)
        + 50;
    let end = out.find("</success>").unwrap();
    Base64.decode(&out[start..end]).unwrap()
}

#[test]
fn machine_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<C2s>();
}

#[test]
fn plain_login_over_tls_bind_and_message() {
    let mut c = Client::tls();
    let out = c.ok(HEADER);
    assert_eq!(
        mask_config_version(&mask_ids(&out)),
        format!(
            "{}<stream:features>{MECHS_ALL}{IAP_MASKED}</stream:features>",
            server_header()
        )
    );
    assert!(c.c2s.deadline().is_some());
    c.login_plain_after_header();
    assert_eq!(c.c2s.full_jid(), None);
    let out = c.ok(HEADER);
    assert_eq!(
        mask_config_version(&mask_ids(&out)),
        format!("{}{BIND_FEATURES}", server_header())
    );
    let out = c.ok(
        "<iq type='set' id='b&amp;1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone</resource></bind></iq>",
    );
    assert_eq!(
        out,
        "<iq type='result' id='b&amp;1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>alice@example.com/phone</jid></bind></iq>"
    );
    assert_eq!(
        c.svc.bound,
        vec![("alice".to_owned(), Some("phone".to_owned()))]
    );
    assert!(c.c2s.is_established());
    assert_eq!(c.c2s.full_jid(), Some("alice@example.com/phone"));
    assert_eq!(c.c2s.deadline(), None);

    let out =
        c.ok("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>");
    assert_eq!(out, "<iq type='result' id='s1'/>");
    let out = c.ok("<message to='bob@example.com' from='mallory@evil.example'><body>hi</body></message><presence/>");
    assert_eq!(out, "");
    assert_eq!(c.svc.stanzas.len(), 2);
    assert_eq!(
        c.svc.stanzas[0].from().as_deref(),
        Some("alice@example.com/phone")
    );
    assert!(!c.svc.stanzas[0].as_str().contains("mallory"));
    assert_eq!(c.svc.stanzas[0].to().as_deref(), Some("bob@example.com"));
    assert_eq!(
        c.svc.stanzas[1].from().as_deref(),
        Some("alice@example.com/phone")
    );

    let (step, out) = c.send("</stream:stream>");
    assert_eq!((step, out.as_str()), (Step::Close, "</stream:stream>"));
    assert!(!c.c2s.is_established());
    let (step, out) = c.send("<presence/>");
    assert_eq!((step, out.as_str()), (Step::Close, ""));
}

#[test]
fn bind_without_resource_and_conflict_use_the_returned_jid() {
    let mut c = Client::tls();
    c.login_plain();
    c.ok(HEADER);
    let out = c.ok("<iq id='b' type='set'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(
        out.contains("<jid>alice@example.com/generated</jid>"),
        "{out}"
    );
    assert_eq!(c.svc.bound, vec![("alice".to_owned(), None)]);

    let mut c = Client::tls();
    c.svc.taken.push("phone".to_owned());
    c.login_plain();
    let out = c.bind("phone");
    assert!(
        out.contains("<jid>alice@example.com/phone-2</jid>"),
        "{out}"
    );
    assert_eq!(c.c2s.full_jid(), Some("alice@example.com/phone-2"));
}

#[test]
fn bind_errors() {
    let mut c = Client::tls();
    c.svc.full = true;
    c.login_plain();
    let out = c.bind("phone");
    assert_eq!(
        out,
        "<iq type='error' id='b1'><error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    );
    assert!(!c.c2s.is_established());
    c.svc.full = false;
    let out = c.ok(
        "<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>bad</resource></bind></iq>",
    );
    assert_eq!(
        out,
        "<iq type='error' id='b2'><error type='modify'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    );
    let out = c.ok(
        "<iq type='set' id='b3'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>ok</resource></bind></iq>",
    );
    assert!(out.contains("<jid>alice@example.com/ok</jid>"));
}

#[test]
fn stanza_before_bind_is_not_authorized() {
    let mut c = Client::tls();
    c.login_plain();
    c.ok(HEADER);
    let (step, out) = c.send("<message to='bob@example.com'><body>x</body></message>");
    assert_eq!((step, out), (Step::Close, stream_error("not-authorized")));
    assert!(c.svc.stanzas.is_empty());
}

fn scram_login<S: ScramProvider>(mechanism: &str, password: &str) -> (Client, Step, String) {
    scram_login_as::<S>(Client::tls(), mechanism, "alice", password)
}

fn scram_login_as<S: ScramProvider>(
    mut c: Client,
    mechanism: &str,
    user: &str,
    password: &str,
) -> (Client, Step, String) {
    c.ok(HEADER);
    let mut client = Scram::<S>::new(user, password, ChannelBinding::None).unwrap();
    let first = Base64.encode(client.initial());
    let out = c.ok(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>{first}</auth>"
    ));
    let server_first = challenge_payload(&out);
    let final_ = Base64.encode(client.response(&server_first).unwrap());
    let (step, out) = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{final_}</response>"
    ));
    if step
        == (Step::Authenticated {
            node: "alice".to_owned(),
        })
    {
        client
            .success(&success_payload(&out))
            .expect("server signature verifies");
    }
    (c, step, out)
}

#[test]
fn scram_sha1_against_sasl_client() {
    let (mut c, step, _) = scram_login::<Sha1>("SCRAM-SHA-1", "pw");
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
    assert!(c
        .bind("laptop")
        .contains("<jid>alice@example.com/laptop</jid>"));
}

#[test]
fn scram_sha256_against_sasl_client() {
    let (mut c, step, _) = scram_login::<Sha256>("SCRAM-SHA-256", "pw");
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
    assert!(c
        .bind("laptop")
        .contains("<jid>alice@example.com/laptop</jid>"));
}

#[test]
fn scram_wrong_password() {
    for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-256"] {
        let (_, step, out) = if mechanism == "SCRAM-SHA-1" {
            scram_login::<Sha1>(mechanism, "wrong")
        } else {
            scram_login::<Sha256>(mechanism, "wrong")
        };
        assert_eq!((step, out.as_str()), (Step::Continue, NOT_AUTHORIZED));
    }
}

#[test]
fn scram_without_initial_response_and_unknown_user() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let out = c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'/>");
    assert_eq!(out, "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    // An unknown user gets a challenge that looks real, then fails like a wrong password.
    let mut client = Scram::<Sha256>::new("nobody", "pw", ChannelBinding::None).unwrap();
    let first = Base64.encode(client.initial());
    let out = c.ok(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{first}</response>"
    ));
    let server_first = challenge_payload(&out);
    assert!(String::from_utf8(server_first.clone())
        .unwrap()
        .contains(",i=64"));
    let final_ = Base64.encode(client.response(&server_first).unwrap());
    let out = c.ok(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{final_}</response>"
    ));
    assert_eq!(out, NOT_AUTHORIZED);
    assert_eq!(c.svc.lookups, vec!["nobody".to_owned()]);
}

/// One PLAIN attempt on a fresh TLS stream whose server is configured with `iterations`, with
/// alice holding a device key: RFC 6120 `<auth/>`, or XEP-0388 `<authenticate/>` with `sasl2`.
/// Returns the step, the answer and the PBKDF2 rounds the server ran for it.
fn plain_attempt(iterations: u32, sasl2: bool, user: &str, password: &str) -> (Step, String, u64) {
    let mut config = (*config(false, false)).clone();
    config.scram_iterations = iterations;
    let mut c = Client::new(Security::Tls, Arc::new(config));
    let alice = c.svc.users.get_mut("alice").unwrap();
    alice.device_keys.push(device_key_hash(&new_device_key()));
    c.ok(HEADER);
    let request = if sasl2 {
        sasl2_plain_as(user, password, "")
    } else {
        plain_auth("", user, password)
    };
    let before = pbkdf2_rounds_on_this_thread();
    let (step, out) = c.send(&request);
    (step, out, pbkdf2_rounds_on_this_thread() - before)
}

const SASL2_NOT_AUTHORIZED: &str = "<failure xmlns='urn:xmpp:sasl:2'>\
                                    <not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>";

/// Goal: SASL PLAIN for a user that does not exist runs the key stretching a known user's check
/// runs, with the server's configured count (a device-key-shaped password too), then fails with
/// `not-authorized`; it does not fail at once, which would tell unknown users by the time.
/// Method: the machine with a mock store; this thread's PBKDF2 rounds counted (no clock).
#[test]
fn plain_unknown_user_runs_the_configured_key_stretching() {
    let device_key_shaped = new_device_key();
    for sasl2 in [false, true] {
        let failure = if sasl2 {
            SASL2_NOT_AUTHORIZED
        } else {
            NOT_AUTHORIZED
        };
        for iterations in [SCRAM_ITERATIONS, 100] {
            for password in ["pw", device_key_shaped.as_str()] {
                assert_eq!(
                    plain_attempt(iterations, sasl2, "mallory", password),
                    (Step::Continue, failure.to_owned(), u64::from(iterations)),
                    "sasl2 {sasl2}, {iterations} iterations, {password}"
                );
            }
        }
    }
}

/// Goal: an unknown user's SCRAM challenge carries the server's configured iteration count,
/// which new accounts get, not a constant, and a salt that stays the same; a known user's
/// carries the count stored with the account. Method: the machine with a mock store.
#[test]
fn scram_unknown_user_gets_the_configured_iterations() {
    let server_first = |iterations: u32, mechanism: &str, user: &str| {
        let mut config = (*config(false, false)).clone();
        config.scram_iterations = iterations;
        let mut c = Client::new(Security::Tls, Arc::new(config));
        c.ok(HEADER);
        let first = Base64.encode(format!("n,,n={user},r=abcdef"));
        let out = c.ok(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>{first}</auth>"
        ));
        let payload = String::from_utf8(challenge_payload(&out)).unwrap();
        let (_, salt_and_count) = payload.split_once(",s=").expect(&payload);
        salt_and_count.to_owned()
    };
    for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-256"] {
        let unknown = server_first(SCRAM_ITERATIONS, mechanism, "mallory");
        assert!(unknown.ends_with(",i=64"), "{unknown}");
        assert_eq!(
            server_first(SCRAM_ITERATIONS, mechanism, "mallory"),
            unknown
        );
        assert!(server_first(1000, mechanism, "mallory").ends_with(",i=1000"));
        // alice was created with 64 iterations; another configured count does not change hers.
        assert!(server_first(1000, mechanism, "alice").ends_with(",i=64"));
    }
}

/// Goal: a known user's wrong secret and an unknown user fail alike: the same condition, the
/// same bytes, the same key stretching, over PLAIN (RFC 6120 and SASL2, passwords and
/// device-key-shaped ones) and SCRAM (the exchange runs to its end for both). Method: the
/// machine with a mock store; PBKDF2 rounds counted (no clock).
#[test]
fn failed_logins_look_alike_for_known_and_unknown_users() {
    let wrong_key = new_device_key();
    for sasl2 in [false, true] {
        for password in ["wrong", wrong_key.as_str()] {
            let known = plain_attempt(SCRAM_ITERATIONS, sasl2, "alice", password);
            let unknown = plain_attempt(SCRAM_ITERATIONS, sasl2, "mallory", password);
            assert_eq!(known, unknown, "sasl2 {sasl2}, {password}");
            assert_eq!(known.2, u64::from(SCRAM_ITERATIONS));
        }
    }
    for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-256"] {
        let attempt = |user: &str, password: &str| {
            let (c, step, out) = if mechanism == "SCRAM-SHA-1" {
                scram_login_as::<Sha1>(Client::tls(), mechanism, user, password)
            } else {
                scram_login_as::<Sha256>(Client::tls(), mechanism, user, password)
            };
            assert_eq!(c.svc.lookups, vec![user.to_owned()]);
            (step, out)
        };
        let known = attempt("alice", "wrong");
        assert_eq!(known, (Step::Continue, NOT_AUTHORIZED.to_owned()));
        assert_eq!(attempt("mallory", "wrong"), known);
        assert_eq!(attempt("mallory", "pw"), known);
    }
}

#[test]
fn scram_rejects_channel_binding_and_tampering() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let first = Base64.encode("p=tls-unique,,n=alice,r=abcdef");
    let out = c.ok(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{first}</auth>"
    ));
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><malformed-request/></failure>"
    );

    // A client-final with another nonce fails even with a proof computed over it.
    let mut client = Scram::<Sha1>::new("alice", "pw", ChannelBinding::None).unwrap();
    let first = Base64.encode(client.initial());
    let out = c.ok(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{first}</auth>"
    ));
    let server_first = String::from_utf8(challenge_payload(&out)).unwrap();
    let tampered = server_first.replacen("r=", "r=x", 1);
    let final_ = Base64.encode(client.response(tampered.as_bytes()).unwrap());
    let (step, out) = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{final_}</response>"
    ));
    assert_eq!((step, out.as_str()), (Step::Continue, NOT_AUTHORIZED));
}

#[test]
fn wrong_password_then_policy_violation_after_three() {
    let mut c = Client::tls();
    c.ok(HEADER);
    assert_eq!(c.ok(&plain_auth("", "alice", "nope")), NOT_AUTHORIZED);
    // Unknown user: same answer.
    assert_eq!(c.ok(&plain_auth("", "bob", "pw")), NOT_AUTHORIZED);
    let (step, out) = c.send(&plain_auth("", "alice", "nope2"));
    assert_eq!(step, Step::Close);
    assert_eq!(
        out,
        format!("{NOT_AUTHORIZED}{}", stream_error("policy-violation"))
    );
}

#[test]
fn plain_details() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let out = c.ok(&plain_auth("bob@example.com", "alice", "pw"));
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><invalid-authzid/></failure>"
    );
    // Username is normalised; a matching authzid is fine.
    let (step, _) = c.send(&plain_auth("alice@example.com", "ALICE", "pw"));
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
    assert_eq!(c.svc.lookups, vec!["alice".to_owned()]);

    // No initial response: empty challenge, then the response.
    let mut c = Client::tls();
    c.ok(HEADER);
    let out = c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'/>");
    assert_eq!(out, "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    let payload = Base64.encode("\0alice\0pw");
    let (step, _) = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{payload}</response>"
    ));
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
}

#[test]
fn sasl_failure_conditions() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let out =
        c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'>=</auth>");
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><invalid-mechanism/></failure>"
    );
    let out =
        c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!notbase64</auth>");
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><incorrect-encoding/></failure>"
    );

    let mut c = Client::tls();
    c.ok(HEADER);
    c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'/>");
    let out = c.ok("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><aborted/></failure>"
    );
    // Back to choosing a mechanism.
    let (step, _) = c.send(&plain_auth("", "alice", "pw"));
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
}

#[test]
fn plain_not_offered_without_tls() {
    let mut c = Client::new(Security::Plain, config(false, false));
    let out = c.ok(HEADER);
    assert!(
        out.ends_with(&format!("<stream:features>{MECHS_SCRAM}</stream:features>")),
        "{out}"
    );
    let out = c.ok(&plain_auth("", "alice", "pw"));
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><encryption-required/></failure>"
    );
    assert!(c.svc.lookups.is_empty());
    // SCRAM still works.
    let mut client = Scram::<Sha1>::new("alice", "pw", ChannelBinding::None).unwrap();
    let first = Base64.encode(client.initial());
    let out = c.ok(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{first}</auth>"
    ));
    let final_ = Base64.encode(client.response(&challenge_payload(&out)).unwrap());
    let (step, _) = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{final_}</response>"
    ));
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
}

#[test]
fn plaintext_allowed_offers_everything() {
    let mut c = Client::new(Security::Plain, config(true, true));
    let out = c.ok(HEADER);
    assert!(
        mask_config_version(&out).ends_with(&format!(
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>{MECHS_ALL}{IAP_MASKED}</stream:features>"
        )),
        "{out}"
    );
    c.login_plain_after_header();
}

impl Client {
    fn login_plain_after_header(&mut self) {
        let (step, _) = self.send(&plain_auth("", "alice", "pw"));
        assert_eq!(
            step,
            Step::Authenticated {
                node: "alice".to_owned()
            }
        );
    }
}

#[test]
fn starttls_flow() {
    let mut c = Client::new(Security::Plain, config(true, false));
    let out = c.ok(HEADER);
    assert!(
        out.ends_with(
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>"
        ),
        "{out}"
    );
    // Bytes pipelined after <starttls/> in the clear are dropped.
    let (step, out) = c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><message/>");
    assert_eq!(
        (step, out.as_str()),
        (
            Step::StartTls,
            "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        )
    );
    assert_eq!(c.ok("<ignored/>"), "");
    c.c2s.handle_tls_established();
    let out = c.ok(HEADER);
    assert_eq!(
        mask_config_version(&mask_ids(&out)),
        format!(
            "{}<stream:features>{MECHS_ALL}{IAP_MASKED}</stream:features>",
            server_header()
        )
    );
    c.login_plain_after_header();
    assert!(c.bind("r").contains("<jid>alice@example.com/r</jid>"));
}

#[test]
fn auth_before_required_starttls_is_policy_violation() {
    let mut c = Client::new(Security::Plain, config(true, false));
    c.ok(HEADER);
    let (step, out) = c.send(&plain_auth("", "alice", "pw"));
    assert_eq!((step, out), (Step::Close, stream_error("policy-violation")));
    assert!(c.svc.lookups.is_empty());
}

#[test]
fn starttls_when_not_offered_fails() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let (step, out) = c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    assert_eq!(
        (step, out.as_str()),
        (
            Step::Close,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"
        )
    );
}

#[test]
fn bad_namespace() {
    let mut c = Client::tls();
    let (step, out) = c.send(
        "<stream:stream to='example.com' version='1.0' xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    assert_eq!(step, Step::Close);
    assert_eq!(
        mask_config_version(&mask_ids(&out)),
        format!("{}{}", server_header(), stream_error("invalid-namespace"))
    );

    let mut c = Client::tls();
    let (step, out) =
        c.send("<stream:stream to='example.com' version='1.0' xmlns='jabber:client' xmlns:stream='urn:wrong'>");
    assert_eq!(step, Step::Close);
    assert!(out.ends_with(&stream_error("invalid-namespace")));
}

#[test]
fn host_and_version() {
    let mut c = Client::tls();
    let (step, out) = c.send(&HEADER.replace("example.com", "other.example"));
    assert_eq!(step, Step::Close);
    assert_eq!(
        mask_config_version(&mask_ids(&out)),
        format!("{}{}", server_header(), stream_error("host-unknown"))
    );

    let mut c = Client::tls();
    let out = c.ok(&HEADER.replace("to='example.com'", "to='EXAMPLE.com'"));
    assert!(out.contains("<stream:features>"));

    let mut c = Client::tls();
    let out = c.ok(&HEADER.replace(" to='example.com'", ""));
    assert!(out.contains("<stream:features>"));

    let mut c = Client::tls();
    let (step, out) = c.send(&HEADER.replace(" version='1.0' xmlns", " xmlns"));
    assert_eq!(step, Step::Close);
    assert!(out.ends_with(&stream_error("unsupported-version")), "{out}");

    let mut c = Client::tls();
    let out = c.ok(&HEADER.replace("version='1.0' xmlns", "version='1.5' xmlns"));
    assert!(out.contains("version='1.0'"));
}

#[test]
fn malformed_xml() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let (step, out) = c.send("<message><body></message>");
    assert_eq!((step, out), (Step::Close, stream_error("not-well-formed")));
}

#[test]
fn doctype_is_restricted() {
    let mut c = Client::tls();
    let (step, out) = c.send("<?xml version='1.0'?><!DOCTYPE foo [<!ENTITY x 'y'>]>");
    assert_eq!(step, Step::Close);
    assert_eq!(
        mask_config_version(&mask_ids(&out)),
        format!("{}{}", server_header(), stream_error("restricted-xml"))
    );
}

#[test]
fn oversized_stanza() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let big = format!("<message><body>{}</body></message>", "a".repeat(8192));
    let (step, out) = c.send(&big);
    assert_eq!((step, out), (Step::Close, stream_error("policy-violation")));
}

#[test]
fn timeout() {
    let mut c = Client::tls();
    let start = c.now;
    assert_eq!(c.c2s.deadline(), Some(start + Duration::from_secs(30)));
    let mut out = Vec::new();
    assert_eq!(
        c.c2s.handle_tick(&mut out, start + Duration::from_secs(29)),
        Step::Continue
    );
    assert!(out.is_empty());
    c.ok(HEADER);
    assert_eq!(
        c.c2s.handle_tick(&mut out, start + Duration::from_secs(30)),
        Step::Close
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        stream_error("connection-timeout")
    );
    assert_eq!(c.c2s.deadline(), None);

    // Bound sessions have no deadline.
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    let mut out = Vec::new();
    assert_eq!(
        c.c2s
            .handle_tick(&mut out, start + Duration::from_secs(3600)),
        Step::Continue
    );
    assert!(out.is_empty());
}

#[test]
fn stanza_before_auth_is_not_authorized() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let (step, out) = c.send("<message to='bob@example.com'><body>x</body></message>");
    assert_eq!((step, out), (Step::Close, stream_error("not-authorized")));
    assert!(c.svc.stanzas.is_empty());
}

#[test]
fn established_other_elements() {
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    // XEP-0198 elements before enable.
    let out = c.ok("<r xmlns='urn:xmpp:sm:3'/>");
    assert_eq!(
        out,
        "<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
    );
    let (step, out) = c.send("<foo xmlns='urn:example'/>");
    assert_eq!(
        (step, out),
        (Step::Close, stream_error("unsupported-stanza-type"))
    );
}

#[test]
fn server_close() {
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    let mut out = Vec::new();
    c.c2s.handle_close(Some("system-shutdown"), &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        stream_error("system-shutdown")
    );
    assert!(!c.c2s.is_established());
    let mut out = Vec::new();
    c.c2s.handle_close(None, &mut out);
    assert!(out.is_empty());
    assert_eq!(c.send("<presence/>"), (Step::Close, String::new()));

    // Before our header: header first.
    let mut c = Client::tls();
    let mut out = Vec::new();
    c.c2s.handle_close(None, &mut out);
    assert_eq!(
        mask_ids(&String::from_utf8(out).unwrap()),
        format!("{}</stream:stream>", server_header())
    );
}

#[test]
fn byte_at_a_time_gives_the_same_output() {
    let input = [
        HEADER.to_owned(),
        plain_auth("", "alice", "pw"),
        HEADER.to_owned(),
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>ü</resource></bind></iq>"
            .to_owned(),
        "<message to='bob@example.com'><body>héllo</body></message>".to_owned(),
        "</stream:stream>".to_owned(),
    ]
    .concat();

    let run = |chunk: usize| {
        let mut c = Client::tls();
        let mut out = Vec::new();
        let mut steps = Vec::new();
        for piece in input.as_bytes().chunks(chunk) {
            let step = c.c2s.handle_bytes(piece, &mut c.svc, &mut out, c.now);
            if step != Step::Continue {
                steps.push(step);
            }
        }
        let stanzas: Vec<String> = c
            .svc
            .stanzas
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        (mask_ids(&String::from_utf8(out).unwrap()), steps, stanzas)
    };
    // In one chunk the bytes after <success/> belong to the old stream and are dropped, so the
    // reference run is message by message.
    let mut c = Client::tls();
    let mut reference = String::new();
    let mut steps = Vec::new();
    for part in [
        HEADER.to_owned(),
        plain_auth("", "alice", "pw"),
        HEADER.to_owned(),
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>ü</resource></bind></iq>"
            .to_owned(),
        "<message to='bob@example.com'><body>héllo</body></message>".to_owned(),
        "</stream:stream>".to_owned(),
    ] {
        let (step, out) = c.send(&part);
        reference.push_str(&out);
        if step != Step::Continue {
            steps.push(step);
        }
    }
    let stanzas: Vec<String> = c
        .svc
        .stanzas
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert!(
        reference.contains("<jid>alice@example.com/ü</jid>"),
        "{reference}"
    );
    assert_eq!(
        steps,
        vec![
            Step::Authenticated {
                node: "alice".to_owned()
            },
            Step::Close
        ]
    );
    assert_eq!(stanzas.len(), 1);
    assert_eq!(run(1), (mask_ids(&reference), steps, stanzas));
}

#[test]
fn stream_management_counts_and_acks() {
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    // One stanza before enable: not counted.
    c.ok("<presence/>");
    c.svc.settled = 1;
    assert_eq!(
        c.ok("<enable xmlns='urn:xmpp:sm:3'/>"),
        "<enabled xmlns='urn:xmpp:sm:3'/>"
    );
    assert!(c.svc.sm_enabled);
    assert!(c.c2s.sm_enabled());
    c.ok("<message to='bob@example.com'><body>1</body></message>");
    c.ok("<message to='bob@example.com'><body>2</body></message>");
    // The second message is not settled yet: the ack covers only the first...
    c.svc.settled = 2;
    assert_eq!(
        c.ok("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='1'/>"
    );
    // ...and a second ack follows once it settles.
    c.svc.settled = 3;
    let mut out = Vec::new();
    c.c2s.handle_settled(&mut c.svc, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "<a xmlns='urn:xmpp:sm:3' h='2'/>"
    );
    let mut out = Vec::new();
    c.c2s.handle_settled(&mut c.svc, &mut out);
    assert!(out.is_empty(), "no ack without a request");

    // Outbound: kept until acked; stored messages are reported on ack.
    let mut out = Vec::new();
    for i in 0..3u64 {
        let step = c.c2s.handle_outbound(
            Bytes::from(format!("<message id='{i}'/>")),
            (i != 1).then_some(10 + i),
            &mut out,
        );
        assert_eq!(step, Step::Continue);
    }
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "<message id='0'/><message id='1'/><message id='2'/>"
    );
    assert_eq!(c.ok("<a xmlns='urn:xmpp:sm:3' h='2'/>"), "");
    assert_eq!(c.svc.acked, [10]);
    assert_eq!(c.ok("<a xmlns='urn:xmpp:sm:3' h='3'/>"), "");
    assert_eq!(c.svc.acked, [10, 12]);
    // An ack for more than was sent ends the stream.
    let (step, out) = c.send("<a xmlns='urn:xmpp:sm:3' h='9'/>");
    assert_eq!(step, Step::Close);
    assert!(out.contains("handled-count-too-high"), "{out}");
}

#[test]
fn stream_management_asks_for_acks_and_wraps_around() {
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    c.ok("<enable xmlns='urn:xmpp:sm:3'/>");
    let mut out = Vec::new();
    for _ in 0..SM_REQUEST_EVERY_STANZAS {
        c.c2s
            .handle_outbound(Bytes::from_static(b"<message/>"), None, &mut out);
    }
    assert!(String::from_utf8(out)
        .unwrap()
        .ends_with("<message/><r xmlns='urn:xmpp:sm:3'/>"));
    c.ok(&format!(
        "<a xmlns='urn:xmpp:sm:3' h='{SM_REQUEST_EVERY_STANZAS}'/>"
    ));
    // Counters are mod 2^32: an ack that wraps past zero releases the right number.
    let sm = c.c2s.sm.as_mut().unwrap();
    sm.sent = u32::MAX - 1;
    sm.acked = u32::MAX - 1;
    let mut out = Vec::new();
    for _ in 0..4 {
        c.c2s
            .handle_outbound(Bytes::from_static(b"<message/>"), Some(7), &mut out);
    }
    assert_eq!(c.c2s.sm.as_ref().unwrap().sent, 2);
    assert_eq!(c.ok("<a xmlns='urn:xmpp:sm:3' h='1'/>"), "");
    assert_eq!(c.c2s.sm.as_ref().unwrap().unacked.len(), 1);
    assert_eq!(c.svc.acked, [7, 7, 7]);
    // And h for received stanzas wraps too.
    let sm = c.c2s.sm.as_mut().unwrap();
    sm.local = u64::from(u32::MAX);
    c.svc.settled = 5;
    c.ok("<presence/>");
    assert_eq!(
        c.ok("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='0'/>"
    );
}

#[test]
fn stream_management_resumption() {
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    let out = c.ok("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    let id_at = out.find("id='").expect("resumption id") + 4;
    let id = out[id_at..id_at + 32].to_owned();
    assert_eq!(
        out,
        format!("<enabled xmlns='urn:xmpp:sm:3' id='{id}' resume='true' max='300'/>")
    );
    c.ok("<message to='bob@example.com'><body>1</body></message>");
    c.svc.settled = 1;
    let mut out = Vec::new();
    for i in 0..3u64 {
        c.c2s.handle_outbound(
            Bytes::from(format!("<message id='o{i}'/>")),
            Some(i),
            &mut out,
        );
    }
    c.ok("<a xmlns='urn:xmpp:sm:3' h='1'/>");
    assert_eq!(c.svc.acked, [0]);
    // The connection is lost: the session detaches.
    let (rid, sm, full) = c.c2s.detach().expect("resumable");
    assert_eq!(
        (rid.as_str(), full.as_str()),
        (id.as_str(), "alice@example.com/r")
    );
    assert!(c.c2s.detach().is_none(), "only once");

    // A new connection resumes it: the client had seen 2 of our 3 stanzas.
    let mut n = Client::tls();
    n.svc.detached = Some((rid, sm, full));
    n.svc.stanzas = c.svc.stanzas.clone();
    n.svc.settled = 1;
    n.login_plain();
    assert!(n.ok(HEADER).ends_with(BIND_FEATURES));
    let out = n.ok(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='2'/>"
    ));
    assert_eq!(
        out,
        format!(
            "<resumed xmlns='urn:xmpp:sm:3' h='1' previd='{id}'/><message id='o2'/><r xmlns='urn:xmpp:sm:3'/>"
        )
    );
    assert_eq!(n.svc.acked, [1]);
    assert!(n.c2s.is_established());
    assert_eq!(n.c2s.full_jid(), Some("alice@example.com/r"));
    n.ok("<a xmlns='urn:xmpp:sm:3' h='3'/>");
    assert_eq!(n.svc.acked, [1, 2]);

    // An unknown id fails and the client may bind instead.
    let mut m = Client::tls();
    m.login_plain();
    m.ok(HEADER);
    assert_eq!(
        m.ok("<resume xmlns='urn:xmpp:sm:3' previd='nope' h='0'/>"),
        "<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
    );
    assert!(m
        .ok("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        .contains("<jid>"));
    // Without resume='true' (or with resumption off) there is no id and no detaching.
    m.ok("<enable xmlns='urn:xmpp:sm:3'/>");
    assert!(m.c2s.detach().is_none());
}

/// An idle established stream holds no framer; a partial stanza keeps one until it completes;
/// a stream under another prefix keeps its framer (its name is not the one rebuilt), and both
/// carry on as before. A stream still logging in keeps its framer between flights.
#[test]
fn idle_stream_drops_its_framer() {
    let mut c = Client::tls();
    c.login_plain();
    assert!(c.c2s.framer.is_some(), "kept while logging in");
    c.bind("phone");
    assert!(c.c2s.is_established());
    assert!(c.c2s.framer.is_none(), "idle after bind");
    c.ok("<message to='bob@example.com'><bo");
    assert!(c.c2s.framer.is_some(), "a stanza in progress");
    assert!(c.svc.stanzas.is_empty());
    c.ok("dy>hi</body></message> ");
    assert!(c.c2s.framer.is_none());
    assert_eq!(c.svc.stanzas.len(), 1);
    assert!(c.svc.stanzas[0]
        .as_str()
        .ends_with("<body>hi</body></message>"));
    // Whitespace keepalives arrive on an idle stream and leave it idle.
    c.ok("\n");
    assert!(c.c2s.framer.is_none());
    let (step, out) = c.send("</stream:other>");
    assert_eq!(
        (step, out.as_str()),
        (Step::Close, stream_error("not-well-formed").as_str())
    );

    let header = "<?xml version='1.0'?><s:stream to='example.com' version='1.0' \
                  xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams'>";
    let mut c = Client::tls();
    c.ok(header);
    c.send(&plain_auth("", "alice", "pw"));
    c.ok(header);
    c.ok("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(c.c2s.is_established());
    assert!(c.c2s.framer.is_some(), "kept: its stream is named s:stream");
    c.ok("<presence/>");
    assert_eq!(c.svc.stanzas.len(), 1);
    let (step, out) = c.send("</s:stream>");
    assert_eq!((step, out.as_str()), (Step::Close, "</stream:stream>"));
}

/// What an idle established stream's machine holds inline (a slab slot each): the framer and
/// the login state are not among it.
#[test]
fn machine_is_small() {
    assert!(
        std::mem::size_of::<C2s>() <= 96,
        "{}",
        std::mem::size_of::<C2s>()
    );
}

/// XEP-0198 on an idle stream: once the client has acknowledged everything, the unacked queue
/// holds no buffer; the resumption id is kept as bytes and sent as 32 hex digits.
#[test]
fn stream_management_idle_state_is_compact() {
    let mut c = Client::tls();
    c.login_plain();
    c.bind("r");
    let out = c.ok("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    let id_at = out.find("id='").expect("resumption id") + 4;
    let id = &out[id_at..id_at + 32];
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{id}"
    );
    let mut out = Vec::new();
    for i in 0..3 {
        c.c2s
            .handle_outbound(Bytes::from(format!("<message id='o{i}'/>")), None, &mut out);
    }
    let sm = c.c2s.sm.as_ref().expect("enabled");
    assert_eq!(sm.unacked.len(), 3);
    c.ok("<a xmlns='urn:xmpp:sm:3' h='2'/>");
    assert!(
        c.c2s.sm.as_ref().expect("enabled").unacked.capacity() > 0,
        "one left"
    );
    c.ok("<a xmlns='urn:xmpp:sm:3' h='3'/>");
    assert_eq!(c.c2s.sm.as_ref().expect("enabled").unacked.capacity(), 0);
    let (rid, _, _) = c.c2s.detach().expect("resumable");
    assert_eq!(rid, id);
}

// ---- XEP-0388 (SASL2) with XEP-0386 (Bind 2) ----

const UA_ID: &str = "d4565fa7-4d72-4749-b3d3-740edbf87770";

fn sasl2_plain(password: &str, inner: &str) -> String {
    sasl2_plain_as("alice", password, inner)
}

fn sasl2_plain_as(user: &str, password: &str, inner: &str) -> String {
    let payload = Base64.encode(format!("\0{user}\0{password}"));
    format!(
        "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'>\
         <initial-response>{payload}</initial-response>{inner}</authenticate>"
    )
}

fn bind2(tag: &str, extra: &str) -> String {
    format!("<bind xmlns='urn:xmpp:bind:0'><tag>{tag}</tag>{extra}</bind>")
}

fn user_agent(id: &str) -> String {
    format!("<user-agent id='{id}'><software>Test</software></user-agent>")
}

impl Client {
    /// Sends `data`, which must authenticate; then (as the driver does on the home shard) feeds
    /// nothing, which completes the SASL2 success. Returns what that wrote.
    fn sasl2_authenticated(&mut self, data: &str) -> String {
        let (step, out) = self.send(data);
        assert_eq!(
            step,
            Step::Authenticated {
                node: "alice".to_owned()
            },
            "{out}"
        );
        assert_eq!(out, "", "success waits for the home shard");
        self.ok("")
    }
}

/// The `<authorization-identifier>` of a SASL2 success.
fn authz_id(out: &str) -> &str {
    let start = out.find("<authorization-identifier>").expect(out) + 26;
    let end = out.find("</authorization-identifier>").expect(out);
    &out[start..end]
}

/// Goal: one round trip logs in and binds (XEP-0388 + XEP-0386); the resource is the client's
/// tag and a generated part; a stanza pipelined right after `<authenticate/>` is handled after
/// the success, in order. Method: the machine with a mock router.
#[test]
fn sasl2_plain_with_bind2_and_pipelined_presence() {
    let mut c = Client::tls();
    assert!(c
        .ok(HEADER)
        .contains("<authentication xmlns='urn:xmpp:sasl:2'>"));
    let out = c.sasl2_authenticated(&format!(
        "{}<presence/>",
        sasl2_plain(
            "pw",
            &format!("{}{}", user_agent(UA_ID), bind2("Phone", ""))
        )
    ));
    let jid = authz_id(&out).to_owned();
    let resource = jid.strip_prefix("alice@example.com/Phone/").expect(&jid);
    assert_eq!(resource.len(), 16, "{jid}");
    assert!(!jid.contains(UA_ID), "the user-agent id is never shown");
    assert_eq!(
        out,
        format!(
            "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>{jid}\
             </authorization-identifier><bound xmlns='urn:xmpp:bind:0'></bound></success>\
             <stream:features><sm xmlns='urn:xmpp:sm:3'/></stream:features>"
        )
    );
    assert!(c.c2s.is_established());
    assert_eq!(c.c2s.full_jid(), Some(jid.as_str()));
    assert_eq!(c.svc.stanzas.len(), 1, "the pipelined presence");
    assert_eq!(c.svc.stanzas[0].kind, Kind::Presence);
    assert!(c.svc.stanzas[0].as_str().contains(&jid), "from stamped");

    // Same account and user-agent id: the same resource; another id: another one.
    let mut again = Client::tls();
    again.ok(HEADER);
    let out = again.sasl2_authenticated(&sasl2_plain(
        "pw",
        &format!("{}{}", user_agent(UA_ID), bind2("Phone", "")),
    ));
    assert_eq!(authz_id(&out), jid);
    let mut other = Client::tls();
    other.ok(HEADER);
    let out = other.sasl2_authenticated(&sasl2_plain(
        "pw",
        &format!("{}{}", user_agent("other"), bind2("Phone", "")),
    ));
    assert_ne!(authz_id(&out), jid);
}

/// Goal: a wrong password gets a SASL2 `<failure/>` with the RFC 6120 condition, binds nothing,
/// and leaves the client free to try again; the third failure closes the stream.
#[test]
fn sasl2_wrong_password() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let failure = "<failure xmlns='urn:xmpp:sasl:2'>\
                   <not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>";
    assert_eq!(c.ok(&sasl2_plain("wrong", &bind2("T", ""))), failure);
    assert!(c.svc.bound.is_empty(), "nothing inline is processed");
    let out = c.sasl2_authenticated(&sasl2_plain("pw", &bind2("T", "")));
    assert!(out.contains("<bound xmlns='urn:xmpp:bind:0'>"), "{out}");

    let mut c = Client::tls();
    c.ok(HEADER);
    c.ok(&sasl2_plain("wrong", ""));
    c.ok(&sasl2_plain("wrong", ""));
    let (step, out) = c.send(&sasl2_plain("wrong", ""));
    assert_eq!(step, Step::Close);
    assert!(out.starts_with(failure), "{out}");
    assert!(out.ends_with(&stream_error("policy-violation")), "{out}");
}

/// Goal: SCRAM-SHA-256 over SASL2: challenge, response, then success with the server
/// signature in `<additional-data/>` (checked by the `sasl` crate's client) and XEP-0198 enabled
/// inline in the bind, with a resumption id.
#[test]
fn sasl2_scram_sha256_with_inline_stream_management() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let mut client = Scram::<Sha256>::new("alice", "pw", ChannelBinding::None).unwrap();
    let first = Base64.encode(client.initial());
    let out = c.ok(&format!(
        "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='SCRAM-SHA-256'>\
         <initial-response>{first}</initial-response>{}</authenticate>",
        bind2("Laptop", "<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    ));
    let start = out.find("<challenge xmlns='urn:xmpp:sasl:2'>").expect(&out) + 35;
    let server_first = Base64
        .decode(&out[start..out.find("</challenge>").unwrap()])
        .unwrap();
    let final_ = Base64.encode(client.response(&server_first).unwrap());
    let out = c.sasl2_authenticated(&format!(
        "<response xmlns='urn:xmpp:sasl:2'>{final_}</response>"
    ));
    let start = out.find("<additional-data>").expect(&out) + 17;
    let server_final = Base64
        .decode(&out[start..out.find("</additional-data>").unwrap()])
        .unwrap();
    client
        .success(&server_final)
        .expect("server signature verifies");
    assert!(
        authz_id(&out).starts_with("alice@example.com/Laptop/"),
        "{out}"
    );
    assert!(
        out.contains("<enabled xmlns='urn:xmpp:sm:3' id='") && out.contains("resume='true'"),
        "{out}"
    );
    assert!(
        out.ends_with("</bound></success><stream:features/>"),
        "{out}"
    );
    assert!(c.svc.sm_enabled);
    assert!(c.c2s.sm_enabled());
}

/// Goal: without `<bind/>` the SASL2 success names the bare JID and the stream goes on to RFC
/// 6120 binding, with no restart; a bind the router refuses does the same.
#[test]
fn sasl2_without_bind_and_refused_bind() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let out = c.sasl2_authenticated(&sasl2_plain("pw", ""));
    assert_eq!(
        out,
        "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>alice@example.com\
         </authorization-identifier></success><stream:features>\
         <bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:3'/></stream:features>"
    );
    let out = c.ok(
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>r</resource></bind></iq>",
    );
    assert!(out.contains("<jid>alice@example.com/r</jid>"), "{out}");

    let mut c = Client::tls();
    c.svc.full = true;
    c.ok(HEADER);
    let out = c.sasl2_authenticated(&sasl2_plain("pw", &bind2("T", "")));
    assert_eq!(authz_id(&out), "alice@example.com");
    assert!(!out.contains("<bound"), "{out}");
    assert!(!c.c2s.is_established());
}

/// Goal: SASL2 is not offered nor accepted where PLAIN is not (no TLS); an unknown mechanism
/// and a bad initial response fail in the SASL2 profile; a tag that cannot be part of a
/// resource is left out.
#[test]
fn sasl2_refusals_and_odd_requests() {
    let mut c = Client::new(Security::Plain, config(false, false));
    assert!(!c.ok(HEADER).contains("urn:xmpp:sasl:2"));
    let (step, out) = c.send(&sasl2_plain("pw", ""));
    assert_eq!((step, out), (Step::Close, stream_error("not-authorized")));

    let mut c = Client::tls();
    c.ok(HEADER);
    assert_eq!(
        c.ok("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='X-UNKNOWN'/>"),
        "<failure xmlns='urn:xmpp:sasl:2'>\
         <invalid-mechanism xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>"
    );
    assert_eq!(
        c.ok("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'>\
              <initial-response>!!</initial-response></authenticate>"),
        "<failure xmlns='urn:xmpp:sasl:2'>\
         <incorrect-encoding xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>"
    );
    // PLAIN without an initial response: an empty challenge, then the response.
    let mut c = Client::tls();
    c.ok(HEADER);
    assert_eq!(
        c.ok("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'/>"),
        "<challenge xmlns='urn:xmpp:sasl:2'></challenge>"
    );
    let payload = Base64.encode("\0alice\0pw");
    let out = c.sasl2_authenticated(&format!(
        "<response xmlns='urn:xmpp:sasl:2'>{payload}</response>"
    ));
    assert_eq!(authz_id(&out), "alice@example.com");

    let mut c = Client::tls();
    c.ok(HEADER);
    let long = "x".repeat(BIND2_TAG_BYTES_MAX + 1);
    let out = c.sasl2_authenticated(&sasl2_plain("pw", &bind2(&long, "")));
    let resource = authz_id(&out).strip_prefix("alice@example.com/").unwrap();
    assert_eq!(resource.len(), 16, "{resource}");
    // A legacy `<response/>` during a SASL2 exchange closes the stream (XEP-0388 §2.5.1).
    let mut c = Client::tls();
    c.ok(HEADER);
    c.ok("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'/>");
    let (step, out) = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{payload}</response>"
    ));
    assert_eq!((step, out), (Step::Close, stream_error("not-authorized")));
}

/// Goal: a legacy (RFC 6120) client that pipelines its restarted stream header and bind right
/// after `<auth/>` loses nothing (this was dropped before: the framer was reset on success).
#[test]
fn legacy_pipelined_restart_and_bind_after_auth() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let (step, out) = c.send(&format!(
        "{}{HEADER}<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>r</resource></bind></iq><presence/>",
        plain_auth("", "alice", "pw")
    ));
    assert_eq!(out, "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        }
    );
    let out = c.ok("");
    assert!(out.contains(BIND_FEATURES), "{out}");
    assert!(
        out.ends_with("<jid>alice@example.com/r</jid></bind></iq>"),
        "{out}"
    );
    assert_eq!(c.svc.stanzas.len(), 1, "the pipelined presence");
}

/// Goal: XEP-0198 resumption inline in SASL2 (XEP-0198 §6.2): a detached session is taken over
/// by `<resume/>` inside `<authenticate/>` (the bind is ignored, no features follow, the
/// unacknowledged stanzas are sent again after the success); an unknown id gives `<failed/>`
/// inside the success and a new session is bound.
#[test]
fn sasl2_inline_resumption() {
    let mut c = Client::tls();
    c.ok(HEADER);
    let out = c.sasl2_authenticated(&sasl2_plain(
        "pw",
        &bind2("T", "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"),
    ));
    let id_at = out.find(" id='").expect("resumption id") + 5;
    let id = out[id_at..id_at + 32].to_owned();
    let jid = authz_id(&out).to_owned();
    let mut sent = Vec::new();
    for i in 0..2u64 {
        c.c2s.handle_outbound(
            Bytes::from(format!("<message id='o{i}'/>")),
            None,
            &mut sent,
        );
    }
    let (rid, sm, full) = c.c2s.detach().expect("resumable");
    assert_eq!((rid.as_str(), full.as_str()), (id.as_str(), jid.as_str()));

    let mut n = Client::tls();
    n.svc.detached = Some((rid, sm, full));
    n.ok(HEADER);
    let out = n.sasl2_authenticated(&sasl2_plain(
        "pw",
        &format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='1'/>{}",
            bind2("T", "")
        ),
    ));
    assert_eq!(
        out,
        format!(
            "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>{jid}\
             </authorization-identifier><resumed xmlns='urn:xmpp:sm:3' h='0' previd='{id}'/>\
             </success><message id='o1'/><r xmlns='urn:xmpp:sm:3'/>"
        )
    );
    assert!(n.svc.bound.is_empty(), "the bind is ignored");
    assert_eq!(n.c2s.full_jid(), Some(jid.as_str()));
    assert!(n.c2s.sm_enabled());

    // An unknown id: `<failed/>` in the success, then the bind goes ahead.
    let mut m = Client::tls();
    m.ok(HEADER);
    let out = m.sasl2_authenticated(&sasl2_plain(
        "pw",
        &format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='nope' h='0'/>{}",
            bind2("T", "")
        ),
    ));
    assert!(
        out.contains(
            "</authorization-identifier><failed xmlns='urn:xmpp:sm:3'><item-not-found \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed><bound xmlns='urn:xmpp:bind:0'>"
        ),
        "{out}"
    );
    assert!(m.c2s.is_established());
    assert_eq!(m.svc.bound.len(), 1);
}

// ---- XEP-0509 (Initial Authentication Pipelining) ----

/// A XEP-0509 `<config-version/>` for an `<authenticate/>`.
fn iap(value: &str) -> String {
    format!("<config-version xmlns='urn:xmpp:iap:0' value='{value}'/>")
}

/// The current config version of a direct-TLS stream, learnt as a client does: from the
/// features of a first connection.
fn tls_config_version() -> String {
    let mut c = Client::tls();
    let out = c.ok(HEADER);
    config_version(&out).expect(&out).to_owned()
}

const IAP_MISMATCH: &str = "<failure xmlns='urn:xmpp:sasl:2'>\
                            <aborted xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>\
                            <config-version-mismatch xmlns='urn:xmpp:iap:0'/>";

/// Goal: the config version is tied to the rendered features: the same for every connection
/// of one feature set, another when what is offered changes (STARTTLS offered, PLAIN and SASL2
/// not offered), absent where SASL2 is not offered; it is the hash of the features without it.
/// Method: the features of connections with each feature set.
#[test]
fn config_version_follows_the_features() {
    let features = |security, starttls, plaintext| {
        let mut c = Client::new(security, config(starttls, plaintext));
        let out = c.ok(HEADER);
        let start = out.find("<stream:features>").unwrap() + 17;
        let end = out.find("</stream:features>").unwrap();
        out[start..end].to_owned()
    };
    let tls = features(Security::Tls, false, false);
    let version = config_version(&tls).expect(&tls).to_owned();
    assert_eq!(version.len(), 16, "{version}");
    assert!(
        tls.ends_with(&iap(&version)),
        "the feature comes last: {tls}"
    );
    let digest = Sha256::hash(tls.strip_suffix(&iap(&version)).unwrap().as_bytes());
    assert_eq!(version, Base64.encode(&digest[..12]));
    assert_eq!(
        config_version(&features(Security::Tls, true, true)),
        Some(version.as_str()),
        "same features, same version"
    );
    // The same features in the loopback plaintext mode: the same version.
    assert_eq!(
        config_version(&features(Security::Plain, false, true)),
        Some(version.as_str())
    );
    // STARTTLS offered as well: other features, another version.
    let with_starttls = features(Security::Plain, true, true);
    let other = config_version(&with_starttls).expect(&with_starttls);
    assert_ne!(other, version);
    // No PLAIN, no SASL2: nothing to pipeline, no version.
    assert_eq!(
        config_version(&features(Security::Plain, false, false)),
        None
    );
    assert_eq!(
        config_version(&features(Security::Plain, true, false)),
        None
    );
}

/// Goal: a client that cached the config version sends `<authenticate/>` (and its initial
/// presence) with the stream header and logs in: features and success answer the one flight.
/// Method: the machine with a mock router, everything in one `handle_bytes`.
#[test]
fn iap_pipelined_with_current_version_logs_in() {
    let version = tls_config_version();
    let mut c = Client::tls();
    let (step, out) = c.send(&format!(
        "{HEADER}{}<presence/>",
        sasl2_plain("pw", &format!("{}{}", bind2("Phone", ""), iap(&version)))
    ));
    assert_eq!(
        step,
        Step::Authenticated {
            node: "alice".to_owned()
        },
        "{out}"
    );
    assert!(
        out.ends_with(&format!("{}</stream:features>", iap(&version))),
        "{out}"
    );
    let out = c.ok("");
    assert!(
        out.starts_with("<success xmlns='urn:xmpp:sasl:2'>"),
        "{out}"
    );
    assert!(
        authz_id(&out).starts_with("alice@example.com/Phone/"),
        "{out}"
    );
    assert!(c.c2s.is_established());
    assert_eq!(c.svc.stanzas.len(), 1, "the pipelined presence");
    assert_eq!(c.svc.stanzas[0].kind, Kind::Presence);
}

/// Goal: a stale config version is refused without prejudice (XEP-0509 §2.2): `<aborted/>`
/// with `<config-version-mismatch/>`, no credential lookup, no failed login counted, the
/// presence pipelined behind it discarded; the client then logs in on the same stream with
/// the version the features just carried. Method: the machine with a mock router.
#[test]
fn iap_stale_version_is_refused_then_login_on_the_same_stream() {
    let mut c = Client::tls();
    let (step, out) = c.send(&format!(
        "{HEADER}{}<presence/>",
        sasl2_plain("pw", &format!("{}{}", bind2("Phone", ""), iap("stale")))
    ));
    assert_eq!(step, Step::Continue, "{out}");
    let at = out.find("</stream:features>").expect(&out) + 18;
    let version = config_version(&out[..at]).expect(&out).to_owned();
    assert!(out[at..].starts_with(IAP_MISMATCH), "{out}");
    assert!(out.ends_with("</text></failure>"), "{out}");
    assert!(c.svc.lookups.is_empty(), "no credential lookup");
    assert_eq!(c.c2s.auth_failures(), 0, "not a failed login");
    assert!(
        c.svc.stanzas.is_empty(),
        "the pipelined presence is discarded"
    );
    let out = c.sasl2_authenticated(&format!(
        "{}<presence/>",
        sasl2_plain("pw", &format!("{}{}", bind2("Phone", ""), iap(&version)))
    ));
    assert!(out.contains("<bound xmlns='urn:xmpp:bind:0'>"), "{out}");
    assert_eq!(c.svc.stanzas.len(), 1, "only the second presence");
    assert_eq!(c.c2s.auth_failures(), 0);
}

/// Goal: mismatches do not count toward `AUTH_ATTEMPTS_MAX` (three of them, then a good login,
/// still work; so do three mismatches and two wrong passwords); past `IAP_MISMATCHES_MAX` the
/// stream is closed; past `IAP_PIPELINED_STANZAS_DISCARDED_MAX` pipelined stanzas the old
/// `not-authorized` applies, as it does to a stanza that follows no mismatch.
#[test]
fn iap_mismatches_are_without_prejudice_and_bounded() {
    let version = tls_config_version();
    let mut c = Client::tls();
    c.ok(HEADER);
    for _ in 0..3 {
        let out = c.ok(&sasl2_plain("pw", &iap("stale")));
        assert!(out.starts_with(IAP_MISMATCH), "{out}");
    }
    let out = c.sasl2_authenticated(&sasl2_plain(
        "pw",
        &format!("{}{}", bind2("T", ""), iap(&version)),
    ));
    assert!(out.contains("<bound xmlns='urn:xmpp:bind:0'>"), "{out}");

    let mut c = Client::tls();
    c.ok(HEADER);
    for _ in 0..3 {
        c.ok(&sasl2_plain("pw", &iap("stale")));
    }
    let failure = "<failure xmlns='urn:xmpp:sasl:2'>\
                   <not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></failure>";
    assert_eq!(c.ok(&sasl2_plain("wrong", &iap(&version))), failure);
    assert_eq!(c.ok(&sasl2_plain("wrong", "")), failure);
    assert_eq!(c.c2s.auth_failures(), 2);
    c.sasl2_authenticated(&sasl2_plain("pw", &iap(&version)));

    let mut c = Client::tls();
    c.ok(HEADER);
    for _ in 1..IAP_MISMATCHES_MAX {
        c.ok(&sasl2_plain("pw", &iap("stale")));
    }
    let (step, out) = c.send(&sasl2_plain("pw", &iap("stale")));
    assert_eq!(step, Step::Close);
    assert!(out.starts_with(IAP_MISMATCH), "{out}");
    assert!(out.ends_with(&stream_error("policy-violation")), "{out}");

    let mut c = Client::tls();
    c.ok(HEADER);
    let discarded = "<presence/>".repeat(usize::from(IAP_PIPELINED_STANZAS_DISCARDED_MAX));
    c.ok(&format!("{}{discarded}", sasl2_plain("pw", &iap("stale"))));
    let (step, out) = c.send("<presence/>");
    assert_eq!((step, out), (Step::Close, stream_error("not-authorized")));
    assert!(c.svc.stanzas.is_empty());

    // Discarding ends at the next SASL element: a stanza after a refused password is refused.
    let mut c = Client::tls();
    c.ok(HEADER);
    c.ok(&format!("{}<presence/>", sasl2_plain("pw", &iap("stale"))));
    assert_eq!(c.ok(&sasl2_plain("wrong", "")), failure);
    let (step, out) = c.send("<presence/>");
    assert_eq!((step, out), (Step::Close, stream_error("not-authorized")));
}

thread_local! {
    /// Whether `failing_random` fails now (each test runs on its own thread).
    static RANDOM_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A `RandomFill` that fails while `RANDOM_FAILS` is set, and is `fill_random` otherwise.
fn failing_random(buf: &mut [u8]) -> Result<(), RandomUnavailable> {
    if RANDOM_FAILS.get() {
        return Err(RandomUnavailable);
    }
    fill_random(buf)
}

fn client_with_failing_random() -> Client {
    let mut config = (*config(false, false)).clone();
    config.random = failing_random;
    Client::new(Security::Tls, Arc::new(config))
}

/// Goal: ids that must be unpredictable are never made up when the random number generator
/// fails (they once came out as zeros). Method: a `RandomFill` that fails on demand; a stream
/// opened without randomness is refused with `<internal-server-error/>` behind a header without
/// id; a login that loses randomness after the header gets no generated Bind 2 resource and no
/// XEP-0198 resumption id, and nothing it is sent holds an all-zero id.
#[test]
fn failed_randomness_is_an_error_not_zeros() {
    let mut c = client_with_failing_random();
    RANDOM_FAILS.set(true);
    let (step, out) = c.send(HEADER);
    assert_eq!(step, Step::Close);
    assert_eq!(
        out,
        format!(
            "<?xml version='1.0'?><stream:stream from='example.com' version='1.0' xml:lang='en' \
             xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>{}",
            stream_error("internal-server-error")
        )
    );

    let mut c = client_with_failing_random();
    RANDOM_FAILS.set(false);
    let header = c.ok(HEADER);
    assert!(mask_ids(&header).starts_with(server_header()), "{header}");
    assert!(!header.contains(&"0".repeat(32)), "{header}");
    RANDOM_FAILS.set(true);
    let out = c.sasl2_authenticated(&sasl2_plain(
        "pw",
        &bind2("Phone", "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"),
    ));
    assert_eq!(
        out,
        "<success xmlns='urn:xmpp:sasl:2'><authorization-identifier>alice@example.com\
         </authorization-identifier></success><stream:features>\
         <bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:3'/>\
         </stream:features>"
    );
    assert!(!c.c2s.is_established());
    let out = c.ok("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(out.contains("<jid>alice@example.com/"), "{out}");
    let out = c.ok("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    assert_eq!(out, "<enabled xmlns='urn:xmpp:sm:3'/>");
}

/// Goal: stream ids are fresh per stream and not zeros. Method: two streams' headers.
#[test]
fn stream_ids_are_random() {
    let id = |out: &str| {
        let start = out.find(" id='").expect(out) + 5;
        out[start..start + 32].to_owned()
    };
    let first = id(&Client::tls().ok(HEADER));
    let second = id(&Client::tls().ok(HEADER));
    assert_ne!(first, second);
    assert_ne!(first, "0".repeat(32));
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
}

/// Goal: a login whose client address has used up its failed logins is refused with
/// `temporary-auth-failure` before any credential lookup or key stretching, in both SASL
/// profiles and for a mechanism started without an initial response; wrong credentials (not
/// malformed requests) are what the driver counts.
#[test]
fn refused_addresses_get_temporary_auth_failure_without_a_password_check() {
    let mut c = Client::tls();
    c.ok(HEADER);
    assert_eq!(
        c.ok(&plain_auth("", "alice", "wrong")),
        NOT_AUTHORIZED,
        "a wrong password"
    );
    assert_eq!(c.svc.failed, 1);
    c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!notbase64</auth>");
    assert_eq!(
        c.svc.failed, 1,
        "a malformed request is not a failed password"
    );

    let refused =
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><temporary-auth-failure/></failure>";
    let pbkdf2_before = pbkdf2_rounds_on_this_thread();
    let mut c = Client::tls();
    c.svc.refuse = true;
    c.ok(HEADER);
    c.svc.lookups.clear();
    assert_eq!(c.ok(&plain_auth("", "alice", "pw")), refused);
    // Refused however the mechanism starts.
    assert_eq!(
        c.ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'/>"),
        refused
    );
    // An address that reaches its limit during an exchange is refused at the response.
    let mut c = Client::tls();
    c.ok(HEADER);
    assert!(c
        .ok("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'/>")
        .contains("<challenge"));
    c.svc.refuse = true;
    c.svc.lookups.clear();
    let payload = Base64.encode("\0alice\0pw");
    assert_eq!(
        c.ok(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{payload}</response>"
        )),
        refused
    );
    assert!(c.svc.lookups.is_empty(), "no credential lookup");
    assert_eq!(
        pbkdf2_rounds_on_this_thread(),
        pbkdf2_before,
        "no key stretching"
    );

    // XEP-0388.
    let mut c = Client::tls();
    c.svc.refuse = true;
    c.ok(HEADER);
    let out = c.ok(&format!(
        "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>{payload}</initial-response></authenticate>"
    ));
    assert!(out.contains("<temporary-auth-failure"), "{out}");
    assert!(c.svc.lookups.is_empty());
}
