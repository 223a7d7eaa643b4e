//! The server side of the SASL mechanisms we offer: PLAIN (RFC 4616) and SCRAM-SHA-1 /
//! SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel binding (no `-PLUS` variants).
//!
//! SCRAM is implemented here rather than with `sasl::server::mechanisms::Scram`: that one refuses
//! the `n` GS2 flag unless channel binding is configured, does not check the nonce or the
//! channel-binding echo of the client-final message and compares proofs in variable time. The
//! hash and HMAC primitives are the `sasl` crate's (`ScramProvider`). Nothing here logs or keeps
//! passwords.
//!
//! A failed login must not tell whether the account exists. Both mechanisms run the same steps
//! for an unknown user as for a known one with a wrong secret and fail with the same condition:
//! PLAIN spends the PBKDF2 a known account's check costs (`verify_plain_unknown`, the
//! server's configured iteration count, the user's fake salt); SCRAM shows a fake salt that is
//! stable per user and the configured iteration count, then checks the proof against a fake
//! salted password, which no proof can pass.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as Base64;
use base64::Engine;
use router::credentials::{verify_plain_unknown, Credentials};
use sasl::common::scram::{ScramProvider, Sha1, Sha256};
use shared::limits::JID_PART_BYTES_MAX;

/// Why a SASL exchange failed: one RFC 6120 §6.5 condition each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Aborted,
    EncryptionRequired,
    IncorrectEncoding,
    InvalidAuthzid,
    InvalidMechanism,
    MalformedRequest,
    NotAuthorized,
    TemporaryAuth,
}

impl Failure {
    pub(crate) fn condition(self) -> &'static str {
        match self {
            Failure::Aborted => "aborted",
            Failure::EncryptionRequired => "encryption-required",
            Failure::IncorrectEncoding => "incorrect-encoding",
            Failure::InvalidAuthzid => "invalid-authzid",
            Failure::InvalidMechanism => "invalid-mechanism",
            Failure::MalformedRequest => "malformed-request",
            Failure::NotAuthorized => "not-authorized",
            Failure::TemporaryAuth => "temporary-auth-failure",
        }
    }
}

/// Which SCRAM hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    pub(crate) fn from_mechanism(name: &str) -> Option<ScramHash> {
        match name {
            "SCRAM-SHA-1" => Some(ScramHash::Sha1),
            "SCRAM-SHA-256" => Some(ScramHash::Sha256),
            _ => None,
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::hash(data),
            ScramHash::Sha256 => Sha256::hash(data),
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length, so `InvalidLength` cannot happen; an empty MAC would
        // only make the proof check fail.
        match self {
            ScramHash::Sha1 => Sha1::hmac(data, key).unwrap_or_default(),
            ScramHash::Sha256 => Sha256::hmac(data, key).unwrap_or_default(),
        }
    }

    /// The stored salt and salted password for this hash.
    fn secret(self, credentials: &Credentials) -> (&[u8], &[u8]) {
        match self {
            ScramHash::Sha1 => (&credentials.salt_sha1, &credentials.salted_sha1),
            ScramHash::Sha256 => (&credentials.salt_sha256, &credentials.salted_sha256),
        }
    }
}

/// The local part of `user@domain` after nodeprep (lowercased), or `None` when `user` is not a
/// valid local part.
pub(crate) fn normalize_node(user: &str, domain: &str) -> Option<String> {
    if user.is_empty() || user.len() > JID_PART_BYTES_MAX || user.contains(['@', '/']) {
        return None;
    }
    let jid = jid::BareJid::new(&format!("{user}@{domain}")).ok()?;
    Some(jid.node()?.as_str().to_owned())
}

/// An authorization identity is accepted when it names the authenticated account itself.
fn authzid_matches(authzid: &str, node: &str, domain: &str) -> bool {
    let Ok(requested) = jid::BareJid::new(authzid) else {
        return false;
    };
    let Ok(own) = jid::BareJid::new(&format!("{node}@{domain}")) else {
        return false;
    };
    requested == own
}

/// The generated part of a XEP-0386 resource for a client that sent a XEP-0388 user-agent id:
/// stable for the same account and id, so the client gets the same resource at every login,
/// without exposing the id (64 bits of SHA-256 over account and id, as hex).
pub(crate) fn stable_resource_id(node: &str, user_agent_id: &str) -> String {
    let digest = Sha256::hash(format!("{node}\0{user_agent_id}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::hash(data)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_bytes<const N: usize>() -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    super::fill_random(&mut buf).ok()?;
    Some(buf)
}

/// A per-process key for the fake secrets of unknown users, so that the challenge for a user
/// that does not exist looks like (and stays as stable as) one for a user that does. `None`
/// while no random key can be had (a known key would tell unknown users from known ones).
fn fake_key() -> Option<&'static [u8; 32]> {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    match KEY.get() {
        Some(key) => Some(key),
        None => {
            let fresh = random_bytes::<32>()?;
            Some(KEY.get_or_init(|| fresh))
        }
    }
}

/// The salt shown for the unknown user `node`: 16 bytes, as stored salts are.
fn fake_salt(hash: ScramHash, node: &str) -> Option<Vec<u8>> {
    let mut salt = hash.hmac(fake_key()?, node.as_bytes());
    salt.truncate(router::credentials::SALT_LEN);
    Some(salt)
}

/// A salted password for the unknown user `node`, as long as a stored one, so that checking
/// a proof against it costs what checking a known user's does. (A local part holds no NUL, so
/// the input differs from every `fake_salt` input.)
fn fake_salted_password(hash: ScramHash, node: &str) -> Option<Vec<u8>> {
    Some(hash.hmac(fake_key()?, format!("salted\0{node}").as_bytes()))
}

/// Decodes a SCRAM `saslname` (`=2C` is `,`, `=3D` is `=`; any other `=` is an error).
fn decode_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        match code {
            "2C" => out.push(','),
            "3D" => out.push('='),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// PLAIN: `[authzid] NUL authcid NUL passwd`. Returns the authenticated node.
///
/// `iterations` is the server's configured PBKDF2 count (`scram_iterations`): what an unknown
/// user's failed check spends, as a known account created with it spends on a wrong password.
pub(crate) fn plain(
    message: &[u8],
    domain: &str,
    iterations: u32,
    credentials: impl FnOnce(&str) -> Option<Credentials>,
) -> Result<String, Failure> {
    let mut parts = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::MalformedRequest);
    };
    let (Ok(authzid), Ok(authcid), Ok(password)) = (
        std::str::from_utf8(authzid),
        std::str::from_utf8(authcid),
        std::str::from_utf8(password),
    ) else {
        return Err(Failure::MalformedRequest);
    };
    let node = normalize_node(authcid, domain).ok_or(Failure::NotAuthorized)?;
    if !authzid.is_empty() && !authzid_matches(authzid, &node, domain) {
        return Err(Failure::InvalidAuthzid);
    }
    if password.is_empty() {
        return Err(Failure::NotAuthorized);
    }
    let verified = match credentials(&node) {
        Some(stored) => stored.verify_plain(password),
        None => {
            // This salt never leaves the server (PLAIN shows none): only the work matters, so
            // a salt from the node alone serves while no fake-salt key can be had.
            let salt = fake_salt(ScramHash::Sha256, &node)
                .unwrap_or_else(|| Sha256::hash(node.as_bytes()));
            verify_plain_unknown(password, &salt, iterations)
        }
    };
    if verified {
        Ok(node)
    } else {
        Err(Failure::NotAuthorized)
    }
}

/// The parts of a SCRAM client-first-message we use.
#[derive(Debug)]
pub(crate) struct ClientFirst {
    /// `n,,` / `y,,` / `n,a=...,` exactly as sent: echoed in the client-final `c=`.
    gs2_header: String,
    authzid: Option<String>,
    /// The decoded `n=` username, not yet normalised.
    pub(crate) username: String,
    nonce: String,
    /// client-first-message-bare, part of the AuthMessage.
    bare: String,
}

/// Parses `gs2-header client-first-message-bare` (RFC 5802 §7).
pub(crate) fn parse_client_first(message: &[u8]) -> Result<ClientFirst, Failure> {
    let text = std::str::from_utf8(message).map_err(|_| Failure::MalformedRequest)?;
    let (flag, rest) = text.split_once(',').ok_or(Failure::MalformedRequest)?;
    match flag {
        // We offer no -PLUS mechanism: `y` (client could bind, thinks we cannot) is fine.
        "n" | "y" => {}
        // Channel binding requested on a mechanism without it.
        _ => return Err(Failure::MalformedRequest),
    }
    let (authzid, bare) = rest.split_once(',').ok_or(Failure::MalformedRequest)?;
    let authzid = if authzid.is_empty() {
        None
    } else {
        let name = authzid
            .strip_prefix("a=")
            .ok_or(Failure::MalformedRequest)?;
        Some(decode_saslname(name).ok_or(Failure::MalformedRequest)?)
    };
    let gs2_header = text[..text.len() - bare.len()].to_owned();
    let mut attrs = bare.split(',');
    // A mandatory extension (`m=`) we do not know must fail the exchange.
    let username = attrs
        .next()
        .and_then(|a| a.strip_prefix("n="))
        .ok_or(Failure::MalformedRequest)?;
    let username = decode_saslname(username).ok_or(Failure::MalformedRequest)?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(Failure::MalformedRequest)?;
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(Failure::MalformedRequest);
    }
    Ok(ClientFirst {
        gs2_header,
        authzid,
        username,
        nonce: nonce.to_owned(),
        bare: bare.to_owned(),
    })
}

/// A SCRAM exchange after the server-first-message was sent.
pub(crate) struct ScramServer {
    hash: ScramHash,
    node: String,
    gs2_header: String,
    /// Client nonce followed by ours.
    nonce: String,
    client_first_bare: String,
    server_first: String,
    /// The stored salted password, or for an unknown user a fake one: the exchange runs to
    /// the end, proof check included, and then fails, so neither the answer nor the work
    /// reveals whether the account exists.
    salted_password: Vec<u8>,
    /// Whether the account exists; `false` fails even a proof that checks out.
    known: bool,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramServer")
            .field("hash", &self.hash)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Checks the client-first-message's identities and builds the server-first-message.
    /// `node` is the normalised username; `credentials` are its stored ones, if any.
    /// `iterations` is the server's configured PBKDF2 count (`scram_iterations`), which new
    /// accounts get: the `i=` shown for a user that does not exist.
    pub(crate) fn start(
        hash: ScramHash,
        first: ClientFirst,
        node: String,
        domain: &str,
        credentials: Option<Credentials>,
        iterations: u32,
    ) -> Result<(ScramServer, Vec<u8>), Failure> {
        if let Some(authzid) = &first.authzid {
            if !authzid_matches(authzid, &node, domain) {
                return Err(Failure::InvalidAuthzid);
            }
        }
        let ours = random_bytes::<18>().ok_or(Failure::TemporaryAuth)?;
        let nonce = format!("{}{}", first.nonce, Base64.encode(ours));
        let (salt, iterations, salted_password) = match &credentials {
            Some(c) => {
                let (salt, salted) = hash.secret(c);
                (salt.to_vec(), c.iterations, salted.to_vec())
            }
            None => (
                fake_salt(hash, &node).ok_or(Failure::TemporaryAuth)?,
                // As `Credentials::derive` stores it.
                iterations.max(1),
                fake_salted_password(hash, &node).ok_or(Failure::TemporaryAuth)?,
            ),
        };
        let server_first = format!("r={nonce},s={},i={iterations}", Base64.encode(salt));
        let message = server_first.clone().into_bytes();
        let server = ScramServer {
            hash,
            node,
            gs2_header: first.gs2_header,
            nonce,
            client_first_bare: first.bare,
            server_first,
            salted_password,
            known: credentials.is_some(),
        };
        Ok((server, message))
    }

    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Verifies the client-final-message; returns the server-final-message (`v=...`).
    pub(crate) fn finish(&self, message: &[u8]) -> Result<Vec<u8>, Failure> {
        let text = std::str::from_utf8(message).map_err(|_| Failure::MalformedRequest)?;
        let at = text.rfind(",p=").ok_or(Failure::MalformedRequest)?;
        let without_proof = &text[..at];
        let proof = Base64
            .decode(&text[at + 3..])
            .map_err(|_| Failure::MalformedRequest)?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(Failure::MalformedRequest)?;
        let binding = Base64
            .decode(binding)
            .map_err(|_| Failure::MalformedRequest)?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(Failure::MalformedRequest)?;
        if binding != self.gs2_header.as_bytes() || nonce != self.nonce {
            return Err(Failure::NotAuthorized);
        }
        let salted = &self.salted_password;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_key_expected = self.hash.hmac(salted, b"Client Key");
        let stored_key = self.hash.hash(&client_key_expected);
        let client_signature = self.hash.hmac(&stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(Failure::NotAuthorized);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        if !ct_eq(&self.hash.hash(&client_key), &stored_key) || !self.known {
            return Err(Failure::NotAuthorized);
        }
        let server_key = self.hash.hmac(salted, b"Server Key");
        let server_signature = self.hash.hmac(&server_key, auth_message.as_bytes());
        Ok(format!("v={}", Base64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saslname() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(decode_saslname("a=2"), None);
        assert_eq!(decode_saslname("a=41"), None);
    }

    #[test]
    fn client_first() {
        let f = parse_client_first(b"n,,n=user,r=abc").unwrap();
        assert_eq!(
            (f.gs2_header.as_str(), f.username.as_str(), f.bare.as_str()),
            ("n,,", "user", "n=user,r=abc")
        );
        let f = parse_client_first(b"y,a=user@example.com,n=user,r=abc,x=1").unwrap();
        assert_eq!(f.gs2_header, "y,a=user@example.com,");
        assert_eq!(f.authzid.as_deref(), Some("user@example.com"));
        for bad in [
            &b"p=tls-unique,,n=user,r=abc"[..],
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user",
            b"n,,n=user,r=",
            b"n,n=user,r=abc",
            b"",
            b"\xff,,n=a,r=b",
        ] {
            assert_eq!(
                parse_client_first(bad).unwrap_err(),
                Failure::MalformedRequest,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn nodes() {
        assert_eq!(
            normalize_node("Alice", "example.com").as_deref(),
            Some("alice")
        );
        assert_eq!(normalize_node("a@b", "example.com"), None);
        assert_eq!(normalize_node("a/b", "example.com"), None);
        assert_eq!(normalize_node("", "example.com"), None);
        assert_eq!(normalize_node("a b", "example.com"), None);
        assert!(authzid_matches("ALICE@Example.com", "alice", "example.com"));
        assert!(!authzid_matches("bob@example.com", "alice", "example.com"));
        assert!(!authzid_matches(
            "alice@example.com/r",
            "alice",
            "example.com"
        ));
    }

    /// The client-final-message for `server`, with the proof made from `salted` (RFC 5802 §3).
    fn client_final(server: &ScramServer, salted: &[u8]) -> Vec<u8> {
        let h = server.hash;
        let without_proof = format!("c={},r={}", Base64.encode(&server.gs2_header), server.nonce);
        let auth_message = format!(
            "{},{},{without_proof}",
            server.client_first_bare, server.server_first
        );
        let client_key = h.hmac(salted, b"Client Key");
        let signature = h.hmac(&h.hash(&client_key), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        format!("{without_proof},p={}", Base64.encode(proof)).into_bytes()
    }

    /// Goal: an unknown user's SCRAM exchange checks the proof as a known user's does (against
    /// a fake salted password as long as a stored one) and fails even when the proof checks
    /// out, so no client can log in as a user that does not exist. Method: a proof made from
    /// the fake salted password itself.
    #[test]
    fn scram_unknown_user_never_succeeds() {
        for hash in [ScramHash::Sha1, ScramHash::Sha256] {
            let first = parse_client_first(b"n,,n=mallory,r=abc").unwrap();
            let node = "mallory".to_owned();
            let (mut server, message) =
                ScramServer::start(hash, first, node, "example.com", None, 64).unwrap();
            let message = String::from_utf8(message).unwrap();
            assert!(message.ends_with(",i=64"), "{message}");
            let fake = fake_salted_password(hash, "mallory").unwrap();
            let stored_len = match hash {
                ScramHash::Sha1 => router::credentials::SHA1_LEN,
                ScramHash::Sha256 => router::credentials::SHA256_LEN,
            };
            assert_eq!((fake.len(), &fake), (stored_len, &server.salted_password));
            assert_ne!(fake_salt(hash, "mallory").unwrap(), fake[..16]);
            let proof = client_final(&server, &fake);
            assert_eq!(server.finish(&proof), Err(Failure::NotAuthorized));
            // The same proof would pass for an account whose salted password that is: only the
            // account's absence fails it.
            server.known = true;
            assert!(server.finish(&proof).is_ok());
        }
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
