//! What both daemons share about transport security and node identity:
//! reading PEM files with errors that name them, the metadata key a node's
//! token travels in, and how tokens are stored (hashed) on the coordinator.
//!
//! Node tokens are 256-bit random secrets, not passwords, so one SHA-256
//! is the right stored form (a slow password hash adds nothing against a
//! search space of 2^256 and would cost every join).

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The gRPC metadata key a node sends its token in, as `Bearer <token>`.
pub const TOKEN_METADATA: &str = "authorization";

/// Prefix of a stored token hash.
pub const TOKEN_HASH_PREFIX: &str = "sha256:";

/// The stored form of `token`: `sha256:<hex>`.
pub fn hash_token(token: &str) -> String {
    format!("{TOKEN_HASH_PREFIX}{:x}", Sha256::digest(token.as_bytes()))
}

/// Whether `token` hashes to `stored`, compared in constant time.
pub fn token_matches(token: &str, stored: &str) -> bool {
    let ours = hash_token(token);
    ours.len() == stored.len() && ours.bytes().zip(stored.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A fresh random token: 32 random bytes, hex-encoded.
pub fn new_token() -> String {
    use rand::Rng;
    // The thread generator is a CSPRNG (ChaCha) seeded from the OS.
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An error and its sources, joined: tonic's transport errors keep the
/// useful part (rustls's reason, the refused connection) in their chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Reads a PEM file, naming `what` it should hold when it cannot be read
/// or holds no PEM block.
pub fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::Config(format!(
            "{what} {}: not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Longest node name the coordinator accepts, in bytes.
pub const MAX_NODE_NAME: usize = 128;

/// Whether `name` may name a node: 1 to [`MAX_NODE_NAME`] ASCII letters,
/// digits, `.`, `_` and `-`, starting with a letter or digit (host names
/// qualify). Names reach logs, `run.json`, metrics and the dashboard, so
/// nothing else gets that far; the error describes the name without
/// echoing it.
pub fn check_node_name(name: &str) -> std::result::Result<(), String> {
    let rule = format!(
        "a node name is 1 to {MAX_NODE_NAME} ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
    );
    if name.is_empty() {
        return Err(format!("the node name is empty; {rule}"));
    }
    if name.len() > MAX_NODE_NAME {
        return Err(format!("the node name is {} bytes long; {rule}", name.len()));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if let Some((i, _)) = name.char_indices().find(|&(_, c)| !ok(c)) {
        return Err(format!("the node name has a character not allowed at byte {i}; {rule}"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("the node name starts with '{}'; {rule}", &name[..1]));
    }
    Ok(())
}

/// Reads a token file: its first line, trimmed; it must not be empty.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(Error::Config(format!("token file {} is empty", path.display())));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_checked_exactly() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
        let stored = hash_token(&t);
        assert!(stored.starts_with("sha256:") && !stored.contains(&t));
        assert!(token_matches(&t, &stored));
        assert!(!token_matches(&new_token(), &stored));
        assert!(!token_matches(&t, "sha256:00"));
        // A known vector: SHA-256 of "abc".
        assert_eq!(
            hash_token("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn node_names_are_plain_and_bounded() {
        for good in ["node-1", "edge.example.org", "a", "Pi_4-b", &"n".repeat(MAX_NODE_NAME)] {
            assert_eq!(check_node_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("node\nINFO round complete", "not allowed at byte 4"),
            ("a\u{1b}[31m", "not allowed at byte 1"),
            ("nul\0", "not allowed at byte 3"),
            ("two words", "not allowed at byte 3"),
            ("-lead", "starts with '-'"),
            ("héllo", "not allowed at byte 1"),
        ] {
            let e = check_node_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(bad.is_empty() || !e.contains(bad), "the error echoes {bad:?}: {e}");
        }
        let long = "x".repeat(1 << 20);
        let e = check_node_name(&long).unwrap_err();
        assert!(
            e.starts_with("the node name is 1048576 bytes long") && e.len() < 200,
            "{e}"
        );
    }

    #[test]
    fn pem_and_token_files_are_checked_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_pem(&dir.path().join("ca.pem"), "CA certificate")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("CA certificate") && missing.contains("ca.pem"),
            "{missing}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let err = read_pem(&junk, "server key").unwrap_err().to_string();
        assert!(err.contains("not a PEM file"), "{err}");
        let empty = dir.path().join("token");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_token_file(&empty).unwrap_err().to_string().contains("is empty"));
        std::fs::write(&empty, "abc \nrest").unwrap();
        assert_eq!(read_token_file(&empty).unwrap(), "abc");
    }
}
