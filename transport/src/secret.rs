//! Shared secrets that a server hands out and later asks back (a replica's lease secret, a
//! worker incarnation's session secret): drawn from a cryptographic generator, compared in
//! time independent of where they differ.

use subtle::ConstantTimeEq;

/// `bytes` random bytes from the thread's cryptographic generator, in lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh secret of 256 bits, in hex.
pub fn fresh_secret() -> String {
    random_hex(32)
}

/// Whether `presented` is the secret `held`, in constant time; an empty `held` (no secret was
/// handed out) matches nothing.
pub fn secrets_match(held: &str, presented: &str) -> bool {
    !held.is_empty() && bool::from(held.as_bytes().ct_eq(presented.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_hex_and_match_only_themselves() {
        let a = fresh_secret();
        let b = fresh_secret();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(secrets_match(&a, &a));
        assert!(!secrets_match(&a, &b));
        assert!(!secrets_match(&a, &a[..63]));
        assert!(!secrets_match("", ""));
    }
}
