//! Who may talk to the coordinator: the server's TLS settings and the
//! check every `Join` passes ([`Authenticator`]): the allow-list, then the
//! node's proof of its name (a per-node token checked against its stored
//! hash, or the common name of its mutual-TLS client certificate).
//!
//! A session token handed out by a successful join is what later calls
//! carry; it is random, per join, and travels only inside TLS.

use std::collections::{HashMap, HashSet};
use std::path::Path;

pub use fedge_common::security::error_chain;
use fedge_common::security::{TOKEN_HASH_PREFIX, TOKEN_METADATA, read_pem, token_matches};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::config::{NodeAuth, SecurityConfig};
use crate::{Error, Result};

/// The server's TLS configuration, or `None` in insecure mode.
pub fn server_tls(c: &SecurityConfig) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read_pem(cert, "TLS certificate")?, read_pem(key, "TLS key")?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &c.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem(ca, "client CA certificate")?));
    }
    Ok(Some(tls))
}

/// The certificates of a PEM file (a chain, or CAs), for rustls; `what`
/// names the file in errors.
pub fn pem_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(&read_pem(path, what)?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))
}

/// The private key of a PEM file, for rustls.
pub fn pem_private_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(&read_pem(path, what)?)
        .map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))
}

/// The CAs of a PEM file as rustls trust anchors.
pub fn pem_roots(path: &Path, what: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in pem_certificates(path, what)? {
        roots
            .add(c)
            .map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The organizational unit `coordinator certs` puts in a node's certificate.
pub const NODE_ROLE: &str = "fedge node";
/// The organizational unit `coordinator certs` puts in an operator's certificate.
pub const OPERATOR_ROLE: &str = "fedge operator";

/// Checks that a joining node is allowed and is who it says it is.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: NodeAuth,
    /// Node name → stored token hash (`token` mode).
    tokens: HashMap<String, String>,
    /// Names that may join; empty: any authenticated node.
    allow: HashSet<String>,
    /// The operators' names (`http.operators`): no node may use one.
    operators: HashSet<String>,
}

impl Authenticator {
    /// From the configuration, reading the token file when there is one.
    pub fn from_config(c: &SecurityConfig) -> Result<Self> {
        let tokens = match (&c.tokens, c.node_auth) {
            (Some(path), NodeAuth::Token) => load_tokens(path)?,
            _ => HashMap::new(),
        };
        Ok(Self {
            mode: c.node_auth,
            tokens,
            allow: c.allow.iter().map(|n| n.trim().to_owned()).collect(),
            operators: HashSet::new(),
        })
    }

    /// Refuses the operators of `http.operators` as nodes, so an operator's
    /// credentials never stand in for a node's.
    pub fn with_operators(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.operators = names.into_iter().collect();
        self
    }

    /// Nodes known to the token file.
    pub fn registered(&self) -> usize {
        self.tokens.len()
    }

    /// Checks a `Join` from a node calling itself `name` (a name that
    /// passed [`fedge_common::security::check_node_name`]).
    pub fn check_join<T>(&self, request: &Request<T>, name: &str) -> Result<(), Status> {
        // Who the connection is comes first: an operator's certificate is
        // refused whatever name it asks for.
        let peer = self.peer_identity(request)?;
        if self.operators.contains(name) {
            return Err(Status::permission_denied(format!(
                "{name} is an operator (http.operators); operators cannot join as nodes"
            )));
        }
        if !self.allow.is_empty() && !self.allow.contains(name) {
            return Err(Status::permission_denied(format!(
                "node {name} is not on this coordinator's allow-list"
            )));
        }
        match self.mode {
            NodeAuth::None => Ok(()),
            NodeAuth::Token => {
                let stored = self.tokens.get(name).ok_or_else(|| {
                    Status::permission_denied(format!("unknown node {name}: no token is registered for it"))
                })?;
                let presented = request
                    .metadata()
                    .get(TOKEN_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Status::unauthenticated(format!(
                            "node {name} sent no token (the coordinator requires `authorization: Bearer <token>`; \
                             set security.token or security.token_file on the node)"
                        ))
                    })?;
                if token_matches(presented.trim(), stored) {
                    Ok(())
                } else {
                    Err(Status::unauthenticated(format!(
                        "node {name} presented a token that does not match the one registered for it"
                    )))
                }
            }
            NodeAuth::Certificate => {
                let cn = peer.unwrap_or_default();
                if cn == name {
                    Ok(())
                } else {
                    Err(Status::permission_denied(format!(
                        "node {name} presented a certificate issued to {cn}"
                    )))
                }
            }
        }
    }

    /// In `certificate` mode, the common name of the connection's client
    /// certificate; `None` in the other modes. An operator's certificate
    /// (organizational unit [`OPERATOR_ROLE`]) is refused: it opens the
    /// HTTP side, never a node's calls.
    pub fn peer_identity<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        if self.mode != NodeAuth::Certificate {
            return Ok(None);
        }
        let leaf = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| Status::unauthenticated("the connection presented no client certificate"))?;
        let (cn, role) = certificate_identity(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("the client certificate is unreadable: {e}")))?;
        if role.as_deref() == Some(OPERATOR_ROLE) {
            return Err(Status::permission_denied(
                "the client certificate is an operator's (OU=fedge operator); operators cannot act as nodes",
            ));
        }
        Ok(Some(cn))
    }

    /// In `certificate` mode, every call on a session must come over the
    /// session's node's certificate: a session token alone, taken to
    /// another certified client, is refused.
    pub fn check_session(&self, peer: Option<&str>, node: &str) -> Result<(), Status> {
        match peer {
            Some(cn) if cn != node => Err(Status::permission_denied(format!(
                "this session belongs to node {node}; the connection's certificate was issued to {cn}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The subject common name and organizational unit (the role, where
/// `coordinator certs` issued it) of a DER certificate.
pub(crate) fn certificate_identity(der: &[u8]) -> std::result::Result<(String, Option<String>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or("it has no common name")?
        .as_str()
        .map_err(|e| e.to_string())?;
    let role = cert
        .subject()
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .map(str::to_owned);
    Ok((cn.to_owned(), role))
}

/// Reads a token file: `[nodes]` with `name = "sha256:<64 hex>"` entries.
pub fn load_tokens(path: &Path) -> Result<HashMap<String, String>> {
    load_hashes(path, "nodes", "security.tokens")
}

/// Reads an operator file (`http.operators`): `[operators]` with
/// `name = "sha256:<64 hex>"` entries.
pub fn load_operators(path: &Path) -> Result<HashMap<String, String>> {
    load_hashes(path, "operators", "http.operators")
}

/// Reads the `[table]` of token hashes in the file of `setting`.
fn load_hashes(path: &Path, table: &str, setting: &str) -> Result<HashMap<String, String>> {
    let place = || format!("{setting} {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", place())))?;
    let mut file: HashMap<String, HashMap<String, String>> =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {}", place(), e.message())))?;
    if let Some(other) = file.keys().find(|k| *k != table) {
        return Err(Error::Config(format!(
            "{}: unknown table [{other}]; expected [{table}]",
            place()
        )));
    }
    let entries = file
        .remove(table)
        .ok_or_else(|| Error::Config(format!("{}: no [{table}] table", place())))?;
    for (name, hash) in &entries {
        let hex = hash.strip_prefix(TOKEN_HASH_PREFIX).unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Config(format!(
                "{}: the entry of {name} is not a `{TOKEN_HASH_PREFIX}<64 hex digits>` hash \
                 (tokens are stored hashed, never in the clear)",
                place()
            )));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_common::security::hash_token;
    use tonic::metadata::MetadataValue;

    fn token_auth(dir: &Path, allow: &[&str]) -> Authenticator {
        let path = dir.join("tokens.toml");
        std::fs::write(
            &path,
            format!(
                "[nodes]\nnode-1 = \"{}\"\nnode-2 = \"{}\"\n",
                hash_token("secret-1"),
                hash_token("secret-2")
            ),
        )
        .unwrap();
        Authenticator::from_config(&SecurityConfig {
            insecure: true,
            node_auth: NodeAuth::Token,
            tokens: Some(path),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn with_token(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert(TOKEN_METADATA, MetadataValue::try_from(format!("Bearer {t}")).unwrap());
        }
        r
    }

    #[test]
    fn tokens_decide_who_joins() {
        let dir = tempfile::tempdir().unwrap();
        let auth = token_auth(dir.path(), &[]);
        assert_eq!(auth.registered(), 2);
        assert!(auth.check_join(&with_token(Some("secret-1")), "node-1").is_ok());
        let wrong = auth.check_join(&with_token(Some("secret-2")), "node-1").unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("does not match"), "{}", wrong.message());
        let none = auth.check_join(&with_token(None), "node-1").unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        assert!(none.message().contains("sent no token"), "{}", none.message());
        let unknown = auth.check_join(&with_token(Some("secret-1")), "node-9").unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
        assert!(
            unknown.message().contains("unknown node node-9"),
            "{}",
            unknown.message()
        );
    }

    #[test]
    fn the_allow_list_is_checked_first() {
        let dir = tempfile::tempdir().unwrap();
        let auth = token_auth(dir.path(), &["node-1"]);
        let s = auth.check_join(&with_token(Some("secret-2")), "node-2").unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(s.message(), "node node-2 is not on this coordinator's allow-list");
        assert!(auth.check_join(&with_token(Some("secret-1")), "node-1").is_ok());
    }

    #[test]
    fn token_files_must_hold_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, "[nodes]\nnode-1 = \"plaintext-secret\"\n").unwrap();
        let err = load_tokens(&path).unwrap_err().to_string();
        assert!(
            err.contains("entry of node-1") && err.contains("stored hashed"),
            "{err}"
        );
        std::fs::write(&path, "[nodes\n").unwrap();
        let err = load_tokens(&path).unwrap_err().to_string();
        assert!(err.contains("tokens.toml"), "{err}");
        std::fs::write(&path, format!("[nodes]\nnode-1 = \"{}\"\n", hash_token("t"))).unwrap();
        let err = load_operators(&path).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid configuration: http.operators") && err.contains("unknown table [nodes]"),
            "{err}"
        );
    }
}
