//! `[security]`: TLS and how nodes authenticate.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Transport security and node identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Serve plaintext gRPC without TLS. For development on one machine
    /// only; the coordinator says so loudly at start. Without it, `tls_cert`
    /// and `tls_key` are required.
    pub insecure: bool,
    /// The coordinator's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The coordinator's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA that signs node certificates (PEM). Set: every connection must
    /// present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// How a node proves its name when it joins: `certificate` (mutual TLS;
    /// the certificate's common name is the node's name), `token` (a
    /// per-node secret sent as `authorization: Bearer …`, checked against
    /// `tokens`), or `none`.
    pub node_auth: NodeAuth,
    /// `token`: a TOML file mapping node names to `sha256:<hex>` token
    /// hashes (`coordinator certs` writes one). Unlisted names are refused.
    pub tokens: Option<PathBuf>,
    /// Names of the nodes that may join; empty: any node that authenticates.
    pub allow: Vec<String>,
}

/// How nodes authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAuth {
    #[default]
    None,
    Token,
    Certificate,
}

impl NodeAuth {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Token => "token",
            Self::Certificate => "certificate",
        }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            node_auth: NodeAuth::None,
            tokens: None,
            allow: Vec::new(),
        }
    }
}

impl SecurityConfig {
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("security: {m}")));
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => return bad("tls_cert and tls_key go together; set both or neither"),
            (None, None) if !self.insecure => {
                return bad(
                    "no TLS certificate configured: set security.tls_cert and security.tls_key \
                     (`coordinator certs` makes a development CA and certificates), or set \
                     security.insecure = true to serve plaintext gRPC (development only)",
                );
            }
            (Some(_), Some(_)) if self.insecure => {
                return bad("security.insecure = true contradicts tls_cert/tls_key; choose one");
            }
            _ => {}
        }
        if self.client_ca.is_some() && self.tls_cert.is_none() {
            return bad("client_ca (mutual TLS) needs tls_cert and tls_key");
        }
        match self.node_auth {
            NodeAuth::Certificate if self.client_ca.is_none() => {
                bad("node_auth = \"certificate\" needs client_ca, the CA that signs node certificates")
            }
            NodeAuth::Token if self.tokens.is_none() => {
                bad("node_auth = \"token\" needs tokens, the file of node token hashes")
            }
            _ => Ok(()),
        }?;
        if let Some(n) = self.allow.iter().find(|n| n.trim().is_empty()) {
            return bad(&format!("allow lists an empty node name ({n:?})"));
        }
        Ok(())
    }
}
