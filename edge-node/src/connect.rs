//! The channel to the coordinator: TLS with the configured CA (and this
//! node's client certificate for mutual TLS), HTTP/2 keepalives so long
//! rounds of local training are not mistaken for dead connections.

use std::time::Duration;

use fedge_common::security::read_pem;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::NodeConfig;
use crate::{Error, Result};

/// The endpoint of `config.coordinator`, with TLS when the URL is `https://`.
pub fn endpoint(config: &NodeConfig) -> Result<Endpoint> {
    let url = &config.coordinator;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Config(format!("coordinator URL `{url}`: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let sec = &config.security;
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &sec.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca, "security.ca")?));
        }
        if let (Some(cert), Some(key)) = (&sec.cert, &sec.key) {
            tls = tls.identity(Identity::from_pem(
                read_pem(cert, "security.cert")?,
                read_pem(key, "security.key")?,
            ));
        }
        if let Some(name) = &sec.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            Error::Config(format!(
                "security: TLS settings unusable: {}",
                fedge_common::security::error_chain(&e)
            ))
        })?;
    }
    Ok(endpoint)
}
