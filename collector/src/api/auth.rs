//! Who is asking: a bearer token (its SHA-256 is stored, never the token) or a client
//! certificate signed by the collector's client CA and registered for a principal.

use std::io::Read as _;

use sha2::{Digest as _, Sha256};

use crate::store::Role;

/// The TLS peer of one connection (set by the API server for every request on it).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Names of the verified client certificate (empty without one).
    pub cert_names: Vec<String>,
    pub addr: String,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: String,
    pub role: Role,
    /// "token", "certificate" or "local" (phictl on the database itself).
    pub method: &'static str,
    pub remote: String,
}

impl Caller {
    /// A local operator working on the database directly (`phictl --db`, `phi-collector
    /// principal`): whoever can open the database already holds every right.
    pub fn local() -> Caller {
        let user = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| format!("uid {}", current_uid()));
        Caller {
            principal: user,
            role: Role::Admin,
            method: "local",
            remote: "local".into(),
        }
    }

    pub fn label(&self) -> String {
        format!("{} ({})", self.principal, self.role.as_str())
    }
}

fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

/// A new bearer token: `phi_` and 64 hex digits of kernel randomness.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("phi_{}", hex::encode(bytes)))
}

/// What the store keeps of a token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.trim().as_bytes()).to_vec()
}

/// The bearer token of an `authorization` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// Principal names: letters, digits and `._@-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token().expect("token");
        let b = new_token().expect("token");
        assert_ne!(a, b);
        assert!(a.starts_with("phi_") && a.len() == 68);
        assert_eq!(token_hash(&a), token_hash(&format!(" {a}\n")));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert!(valid_name("alice@example.org") && !valid_name("a b"));
    }
}
