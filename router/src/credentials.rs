//! Salted SCRAM credentials (RFC 5802 / RFC 7677). The server stores only these, never the
//! password: the salted password for SHA-1 and SHA-256, each with its own salt.

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
}

impl Credentials {
    /// Derives credentials with fresh random 16-byte salts. Costs two PBKDF2 runs.
    pub fn derive(password: &str, iterations: u32) -> Credentials {
        let _ = (password, iterations);
        todo!()
    }
    /// True when `password` matches (used by SASL PLAIN); constant-time comparison.
    pub fn verify_plain(&self, password: &str) -> bool {
        let _ = password;
        todo!()
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        todo!()
    }
    pub fn from_bytes(bytes: &[u8]) -> Option<Credentials> {
        let _ = bytes;
        todo!()
    }
}
