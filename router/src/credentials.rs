//! Salted SCRAM credentials (RFC 5802 / RFC 7677). The server stores only these, never the
//! password: the salted password for SHA-1 and SHA-256, each with its own salt.
//!
//! The salted password is RFC 5802's `SaltedPassword = Hi(Normalize(password), salt, i)`, i.e.
//! PBKDF2-HMAC over the password. `Normalize` (SASLprep, RFC 4013) is *not* applied here: the
//! password's UTF-8 bytes are used exactly as given, so the caller must hand the same bytes at
//! account creation and at login (SCRAM clients that apply SASLprep to ASCII passwords produce
//! the same bytes, which covers the common case).
//!
//! An account may also hold *device keys*: random tokens made by the server (`dk-` followed by
//! 64 hex digits, 256 bits from the OS random number generator) and shown once. Only their
//! SHA-256 is stored. A device key is used as the password of SASL PLAIN (over TLS): the check
//! is one SHA-256 and a constant-time comparison per stored key, no PBKDF2, which is safe because
//! a 256-bit random secret cannot be guessed, so key stretching buys nothing. Device keys do not
//! work with SCRAM (its stored keys come from the password).
//!
//! A login for an account that does not exist must cost what a failed login for one that does
//! costs, or the time to fail tells which accounts exist: [`verify_plain_unknown`] is that work.

use std::cell::Cell;
use std::hint::black_box;
use std::thread;

use pbkdf2::pbkdf2_hmac;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// Length of each freshly generated salt, in bytes.
pub const SALT_LEN: usize = 16;
/// Length of a PBKDF2-HMAC-SHA-1 salted password.
pub const SHA1_LEN: usize = 20;
/// Length of a PBKDF2-HMAC-SHA-256 salted password.
pub const SHA256_LEN: usize = 32;

/// The version byte that starts the encoding produced by [`Credentials::to_bytes`].
const FORMAT_V1: u8 = 1;
/// As [`FORMAT_V1`], followed by a count byte and that many 32-byte device key hashes.
const FORMAT_V2: u8 = 2;
/// What starts every device key, so a user (and a log scrubber) can tell one apart.
pub const DEVICE_KEY_PREFIX: &str = "dk-";
/// Random bytes in a device key.
pub const DEVICE_KEY_RANDOM_BYTES: usize = 32;

/// What is stored per account. Serialised by `store` with `to_bytes`/`from_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub iterations: u32,
    pub salt_sha1: Vec<u8>,
    /// PBKDF2-HMAC-SHA-1(password, salt_sha1, iterations), 20 bytes.
    pub salted_sha1: Vec<u8>,
    pub salt_sha256: Vec<u8>,
    /// PBKDF2-HMAC-SHA-256(password, salt_sha256, iterations), 32 bytes.
    pub salted_sha256: Vec<u8>,
    /// SHA-256 of each device key of the account (at most
    /// `shared::limits::DEVICE_KEYS_PER_ACCOUNT_MAX`).
    pub device_keys: Vec<[u8; 32]>,
}

thread_local! {
    /// PBKDF2 rounds run by this thread, summed over every derivation.
    static PBKDF2_ROUNDS: Cell<u64> = const { Cell::new(0) };
}

/// How many PBKDF2 rounds (HMAC iterations, summed over every derivation of either hash) this
/// thread has run. Lets a test see the key stretching a login did (for example that an unknown
/// user pays what a known one pays) without measuring time. Costs one thread-local add per
/// derivation, which takes milliseconds.
pub fn pbkdf2_rounds_on_this_thread() -> u64 {
    PBKDF2_ROUNDS.with(Cell::get)
}

/// The work [`Credentials::verify_plain`] does for a wrong password, done for a user that does
/// not exist; always false. A SASL PLAIN login for an unknown user calls this instead of
/// failing at once, so that its failure takes as long as a known user's wrong password.
///
/// `salt` should be the salt the server would show that user in a SCRAM challenge (stable per
/// user, secret to the server) and `iterations` the server's configured count, the one new
/// accounts get. The PBKDF2-HMAC-SHA-256 output is compared in constant time with a value
/// built to differ from it in one bit, so it cannot match, whatever the password.
///
/// Device keys: a known account fails a login only after PBKDF2, since `verify_plain` skips
/// it only for a device key that matches, and matching takes the 256-bit secret. So this runs
/// PBKDF2 for every password, device-key-shaped or not. Before it, a known account holding
/// device keys spends one SHA-256 and a comparison per stored key on a `dk-` password, one
/// without keys spends nothing; this spends one SHA-256 and one comparison, as an account with
/// one key does. That sits inside the spread between known accounts (one SHA-256 of 67 bytes
/// or 15 more 32-byte comparisons: well under a microsecond, against the milliseconds of
/// PBKDF2), so the cost of a `dk-` password tells nothing about the account's existence.
pub fn verify_plain_unknown(password: &str, salt: &[u8], iterations: u32) -> bool {
    let mut found = Choice::from(0);
    if password.starts_with(DEVICE_KEY_PREFIX) {
        let candidate = device_key_hash(password);
        found |= black_box(candidate).ct_eq(&unmatchable(candidate));
    }
    let candidate = salted_sha256(password.as_bytes(), salt, iterations.max(1));
    // `black_box` keeps the compiler from proving the comparison false and dropping the
    // derivation whose cost is the point.
    found |= black_box(candidate)[..].ct_eq(&unmatchable(candidate)[..]);
    found.into()
}

/// `value` with its lowest bit flipped: never equal to `value`.
fn unmatchable(mut value: [u8; 32]) -> [u8; 32] {
    value[0] ^= 1;
    value
}

/// A new device key, `dk-` and 64 lower-case hex digits, from the OS random number generator.
///
/// # Panics
/// If the operating system's random number generator fails.
pub fn new_device_key() -> String {
    let mut bytes = [0u8; DEVICE_KEY_RANDOM_BYTES];
    getrandom::getrandom(&mut bytes)
        .expect("the operating system's random number generator failed; cannot make a key");
    let mut key = String::with_capacity(DEVICE_KEY_PREFIX.len() + 2 * bytes.len());
    key.push_str(DEVICE_KEY_PREFIX);
    for b in bytes {
        key.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        key.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    key
}

/// What is stored of a device key: its SHA-256.
pub fn device_key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Credentials {
    /// Derives credentials with fresh random 16-byte salts. Costs two PBKDF2 runs.
    ///
    /// The password's bytes are used as given (no SASLprep, see the module docs). An
    /// `iterations` of 0, which RFC 5802 forbids, is raised to 1.
    ///
    /// # Panics
    /// If the operating system's random number generator fails (there is no safe way to go on
    /// without salts).
    pub fn derive(password: &str, iterations: u32) -> Credentials {
        let salt_sha1 = random_salt();
        let salt_sha256 = random_salt();
        Credentials::derive_with_salts(password, iterations, salt_sha1, salt_sha256)
    }

    /// Derives credentials with the given salts (for tests and known-answer checks; accounts
    /// should use [`Credentials::derive`], which draws fresh salts).
    pub fn derive_with_salts(
        password: &str,
        iterations: u32,
        salt_sha1: Vec<u8>,
        salt_sha256: Vec<u8>,
    ) -> Credentials {
        let iterations = iterations.max(1);
        let salted_sha1 = salted_sha1(password.as_bytes(), &salt_sha1, iterations).to_vec();
        let salted_sha256 = salted_sha256(password.as_bytes(), &salt_sha256, iterations).to_vec();
        Credentials {
            iterations,
            salt_sha1,
            salted_sha1,
            salt_sha256,
            salted_sha256,
            device_keys: Vec::new(),
        }
    }

    /// True when `password` matches (used by SASL PLAIN); constant-time comparison.
    ///
    /// A `password` that has the form of a device key is first checked against the account's
    /// device keys (one SHA-256, constant-time comparisons with every stored key); otherwise,
    /// or when no device key matches, the SHA-256 salted password is recomputed, one PBKDF2 run.
    pub fn verify_plain(&self, password: &str) -> bool {
        if self.verify_device_key(password) {
            return true;
        }
        if self.iterations == 0 {
            return false;
        }
        let candidate = salted_sha256(password.as_bytes(), &self.salt_sha256, self.iterations);
        // `ct_eq` on slices of different lengths is false without looking at the contents.
        candidate[..].ct_eq(&self.salted_sha256[..]).into()
    }

    /// True when `key` is one of the account's device keys. Compares with every stored hash in
    /// constant time, so the time taken does not tell which bytes matched.
    pub fn verify_device_key(&self, key: &str) -> bool {
        if self.device_keys.is_empty() || !key.starts_with(DEVICE_KEY_PREFIX) {
            return false;
        }
        let candidate = device_key_hash(key);
        let mut found = Choice::from(0);
        for stored in &self.device_keys {
            found |= candidate.ct_eq(stored);
        }
        found.into()
    }

    /// Encodes as: version byte (1, or 2 with device keys), iterations (u32 little-endian), then `salt_sha1`,
    /// `salted_sha1`, `salt_sha256`, `salted_sha256`, each as a length byte followed by that
    /// many bytes; version 2 then has a count byte and that many 32-byte device key hashes.
    ///
    /// # Panics
    /// If a field is longer than 255 bytes, which [`Credentials::derive`] and
    /// [`Credentials::from_bytes`] never produce.
    pub fn to_bytes(&self) -> Vec<u8> {
        let fields = [
            &self.salt_sha1,
            &self.salted_sha1,
            &self.salt_sha256,
            &self.salted_sha256,
        ];
        let mut out = Vec::with_capacity(
            6 + fields.iter().map(|f| 1 + f.len()).sum::<usize>() + 32 * self.device_keys.len(),
        );
        out.push(if self.device_keys.is_empty() {
            FORMAT_V1
        } else {
            FORMAT_V2
        });
        out.extend_from_slice(&self.iterations.to_le_bytes());
        for field in fields {
            let len = u8::try_from(field.len()).expect("credential fields are at most 255 bytes");
            out.push(len);
            out.extend_from_slice(field);
        }
        if !self.device_keys.is_empty() {
            let count = u8::try_from(self.device_keys.len()).expect("at most 255 device keys");
            out.push(count);
            for key in &self.device_keys {
                out.extend_from_slice(key);
            }
        }
        out
    }

    /// Decodes what [`Credentials::to_bytes`] wrote. `None` on any malformation: unknown
    /// version, truncation, trailing bytes, zero iterations, an empty salt, or a salted password
    /// of the wrong length. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Option<Credentials> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT_V1 && version != FORMAT_V2 {
            return None;
        }
        let (iterations, mut rest) = rest.split_first_chunk::<4>()?;
        let iterations = u32::from_le_bytes(*iterations);
        if iterations == 0 {
            return None;
        }
        let mut field = || -> Option<Vec<u8>> {
            let (&len, tail) = rest.split_first()?;
            let len = usize::from(len);
            if tail.len() < len {
                return None;
            }
            let (value, tail) = tail.split_at(len);
            rest = tail;
            Some(value.to_vec())
        };
        let salt_sha1 = field()?;
        let salted_sha1 = field()?;
        let salt_sha256 = field()?;
        let salted_sha256 = field()?;
        let mut device_keys = Vec::new();
        if version == FORMAT_V2 {
            let (&count, mut tail) = rest.split_first()?;
            if count == 0 {
                return None;
            }
            for _ in 0..count {
                let (key, after) = tail.split_first_chunk::<32>()?;
                device_keys.push(*key);
                tail = after;
            }
            rest = tail;
        }
        if !rest.is_empty()
            || salt_sha1.is_empty()
            || salt_sha256.is_empty()
            || salted_sha1.len() != SHA1_LEN
            || salted_sha256.len() != SHA256_LEN
        {
            return None;
        }
        Some(Credentials {
            iterations,
            salt_sha1,
            salted_sha1,
            salt_sha256,
            salted_sha256,
            device_keys,
        })
    }
}

/// Derives credentials for many users with the same password, spreading the PBKDF2 work over
/// `threads` OS threads (0 counts as 1). Each account gets its own fresh salts. The result is in
/// the order of `users`.
///
/// Meant for `gateway user bulk-add` (creating many test accounts); the cost is two PBKDF2 runs
/// of `iterations` rounds per user, so a million users at 4096 rounds is hours of CPU time:
/// pick a small `iterations` for test accounts.
pub fn derive_many(
    users: &[String],
    password: &str,
    iterations: u32,
    threads: usize,
) -> Vec<(String, Credentials)> {
    if users.is_empty() {
        return Vec::new();
    }
    let threads = threads.clamp(1, users.len());
    let chunk = users.len().div_ceil(threads);
    thread::scope(|scope| {
        let workers: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|user| (user.clone(), Credentials::derive(password, iterations)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(users.len());
        for worker in workers {
            match worker.join() {
                Ok(part) => out.extend(part),
                // Only a failing OS random number generator panics in there; pass it on.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// A fresh random salt from the operating system.
fn random_salt() -> Vec<u8> {
    let mut salt = vec![0u8; SALT_LEN];
    getrandom::getrandom(&mut salt)
        .expect("the operating system's random number generator failed; cannot make salts");
    salt
}

fn count_rounds(iterations: u32) {
    PBKDF2_ROUNDS.with(|rounds| rounds.set(rounds.get().saturating_add(u64::from(iterations))));
}

/// RFC 5802 `Hi(password, salt, i)` with HMAC-SHA-1.
fn salted_sha1(password: &[u8], salt: &[u8], iterations: u32) -> [u8; SHA1_LEN] {
    count_rounds(iterations);
    let mut out = [0u8; SHA1_LEN];
    pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
    out
}

/// RFC 5802 `Hi(password, salt, i)` with HMAC-SHA-256.
fn salted_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; SHA256_LEN] {
    count_rounds(iterations);
    let mut out = [0u8; SHA256_LEN];
    pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn derive_then_verify() {
        let c = Credentials::derive("pencil", 16);
        assert_eq!(c.iterations, 16);
        assert_eq!(c.salt_sha1.len(), SALT_LEN);
        assert_eq!(c.salt_sha256.len(), SALT_LEN);
        assert_eq!(c.salted_sha1.len(), SHA1_LEN);
        assert_eq!(c.salted_sha256.len(), SHA256_LEN);
        assert!(c.verify_plain("pencil"));
        assert!(!c.verify_plain("Pencil"));
        assert!(!c.verify_plain(""));
    }

    #[test]
    fn salts_are_fresh_and_distinct() {
        let a = Credentials::derive("pencil", 1);
        let b = Credentials::derive("pencil", 1);
        assert_ne!(a.salt_sha256, b.salt_sha256);
        assert_ne!(a.salt_sha1, a.salt_sha256);
        assert_ne!(a.salted_sha256, b.salted_sha256);
    }

    #[test]
    fn zero_iterations_become_one() {
        let c = Credentials::derive("x", 0);
        assert_eq!(c.iterations, 1);
        assert!(c.verify_plain("x"));
    }

    #[test]
    fn known_answer_rfc6070() {
        // RFC 6070 test vectors for PBKDF2-HMAC-SHA1.
        assert_eq!(
            hex(&salted_sha1(b"password", b"salt", 1)),
            "0c60c80f961f0e71f3a9b524af6012062fe037a6"
        );
        assert_eq!(
            hex(&salted_sha1(b"password", b"salt", 4096)),
            "4b007901b765489abead49d926f721d065a429c1"
        );
        let c = Credentials::derive_with_salts("password", 1, b"salt".to_vec(), b"salt".to_vec());
        assert_eq!(
            hex(&c.salted_sha1),
            "0c60c80f961f0e71f3a9b524af6012062fe037a6"
        );
    }

    #[test]
    fn known_answer_sha256() {
        // RFC 7914 §11 test vector for PBKDF2-HMAC-SHA256 (first 32 bytes of its 64).
        assert_eq!(
            hex(&salted_sha256(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn bytes_round_trip() {
        let c = Credentials::derive("pencil", 4096);
        let bytes = c.to_bytes();
        assert_eq!(
            bytes.len(),
            1 + 4 + 4 + 2 * SALT_LEN + SHA1_LEN + SHA256_LEN
        );
        let back = Credentials::from_bytes(&bytes).expect("decodes");
        assert_eq!(back, c);
        assert!(back.verify_plain("pencil"));
    }

    #[test]
    fn from_bytes_rejects_truncated_and_garbage() {
        let bytes = Credentials::derive("pencil", 2).to_bytes();
        for len in 0..bytes.len() {
            assert_eq!(
                Credentials::from_bytes(&bytes[..len]),
                None,
                "prefix of {len}"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Credentials::from_bytes(&trailing), None);
        let mut version = bytes.clone();
        version[0] = 2;
        assert_eq!(Credentials::from_bytes(&version), None);
        let mut zero_iter = bytes.clone();
        zero_iter[1..5].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Credentials::from_bytes(&zero_iter), None);
        assert_eq!(Credentials::from_bytes(&[0xff; 100]), None);
        assert_eq!(Credentials::from_bytes(&[1, 1, 0, 0, 0, 255, 1]), None);
    }

    #[test]
    fn device_key_logs_in_without_the_password() {
        let mut c = Credentials::derive("pencil", 2);
        let key = new_device_key();
        assert!(key.starts_with(DEVICE_KEY_PREFIX));
        assert_eq!(
            key.len(),
            DEVICE_KEY_PREFIX.len() + 2 * DEVICE_KEY_RANDOM_BYTES
        );
        assert!(!c.verify_plain(&key), "no device key stored yet");
        c.device_keys.push(device_key_hash(&key));
        assert!(c.verify_device_key(&key));
        assert!(c.verify_plain(&key));
        assert!(c.verify_plain("pencil"), "the password still works");
        let other = new_device_key();
        assert_ne!(other, key);
        assert!(!c.verify_plain(&other));
        assert!(!c.verify_plain(&key[..key.len() - 1]));
        assert!(!c.verify_device_key("pencil"));
        // Round trip through the stored form (version 2), and back to version 1 without keys.
        let bytes = c.to_bytes();
        assert_eq!(bytes[0], FORMAT_V2);
        let back = Credentials::from_bytes(&bytes).expect("decodes");
        assert_eq!(back, c);
        assert!(back.verify_plain(&key));
        for len in 0..bytes.len() {
            assert_eq!(Credentials::from_bytes(&bytes[..len]), None, "prefix {len}");
        }
        c.device_keys.clear();
        assert_eq!(c.to_bytes()[0], FORMAT_V1);
    }

    #[test]
    fn unknown_users_pay_the_known_users_work_and_never_match() {
        let salt = b"fake salt, 16 B".to_vec();
        let mut known = Credentials::derive_with_salts("pw", 64, salt.clone(), salt.clone());
        known.device_keys.push(device_key_hash(&new_device_key()));
        let rounds = |f: &dyn Fn() -> bool| {
            let before = pbkdf2_rounds_on_this_thread();
            let verified = f();
            (verified, pbkdf2_rounds_on_this_thread() - before)
        };
        let wrong_key = new_device_key();
        for password in ["wrong", "pw", wrong_key.as_str(), ""] {
            // Even the password whose PBKDF2 output is exactly what would match fails.
            assert_eq!(
                rounds(&|| verify_plain_unknown(password, &salt, 64)),
                (false, 64),
                "{password:?}"
            );
            assert_eq!(
                rounds(&|| verify_plain_unknown(password, &salt, 0)),
                (false, 1),
                "zero iterations are raised to one, as for derived credentials"
            );
        }
        for password in ["wrong", wrong_key.as_str()] {
            assert_eq!(rounds(&|| known.verify_plain(password)), (false, 64));
        }
        assert_eq!(rounds(&|| known.verify_plain("pw")), (true, 64));
        // Deriving counts both hashes.
        assert_eq!(
            rounds(&|| Credentials::derive("pw", 10).iterations == 10),
            (true, 20)
        );
        assert_eq!(unmatchable([7; 32])[0], 6);
    }

    #[test]
    fn from_bytes_never_panics() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..120))| {
            let _ = Credentials::from_bytes(&bytes);
        });
    }

    #[test]
    fn derive_many_keeps_order_and_salts_each() {
        let users: Vec<String> = (0..10).map(|i| format!("user{i}")).collect();
        for threads in [0, 1, 3, 64] {
            let out = derive_many(&users, "pw", 1, threads);
            assert_eq!(out.len(), users.len());
            for ((name, creds), expected) in out.iter().zip(&users) {
                assert_eq!(name, expected);
                assert!(creds.verify_plain("pw"));
            }
            assert_ne!(out[0].1.salt_sha256, out[1].1.salt_sha256);
        }
        assert!(derive_many(&[], "pw", 1, 4).is_empty());
    }
}
