//! `[http]`: the HTTP side (dashboard, status API, metrics), its TLS and
//! its operators.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

use super::{NodeAuth, SecurityConfig};

/// The coordinator's HTTP server: dashboard, `/api/*`, `/metrics`,
/// `/healthz`. It follows `security`: HTTPS with the coordinator's
/// certificate when gRPC uses TLS, and operator authentication (a bearer
/// token or an operator's client certificate, see `operators`) when nodes
/// must authenticate or `operators` is set. `/healthz` and the dashboard's
/// page itself (which holds no data) stay open.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address, e.g. `0.0.0.0:8080`; unset: no HTTP server.
    pub listen: Option<SocketAddr>,
    /// A TOML file of operators (`[operators]` with `name = "sha256:<hex>"`
    /// token hashes; `coordinator certs` writes one). A request is let in
    /// with `Authorization: Bearer <token>` of a listed operator, or over a
    /// client certificate (signed by `security.client_ca`) whose common
    /// name is a listed operator's.
    pub operators: Option<PathBuf>,
    /// Serve plaintext HTTP to anyone, whatever `security` says (behind a
    /// proxy that does TLS and authentication itself).
    pub insecure: bool,
}

impl HttpConfig {
    /// Whether the HTTP side is served over TLS.
    pub fn tls(&self, security: &SecurityConfig) -> bool {
        security.tls_cert.is_some() && !self.insecure
    }

    /// Whether requests for data must come from an operator.
    pub fn authenticated(&self, security: &SecurityConfig) -> bool {
        !self.insecure && (self.operators.is_some() || security.node_auth != NodeAuth::None)
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.listen.is_none() {
            return Ok(());
        }
        if self.insecure && self.operators.is_some() {
            return Err(Error::Config(
                "http: insecure = true serves the HTTP side to anyone, yet operators is set; choose one".into(),
            ));
        }
        Ok(())
    }
}
