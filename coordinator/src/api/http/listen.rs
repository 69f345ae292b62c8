//! The HTTP side's listener: plaintext TCP, or TLS with the coordinator's
//! certificate (rustls) that asks for, but does not require, a client
//! certificate signed by `security.client_ca`. Handshakes run on their own
//! tasks (a slow or silent client cannot hold up the others); each
//! connection comes with its [`Peer`]: the address and, when a verified
//! client certificate was presented, its common name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::api::security::{pem_certificates, pem_private_key, pem_roots};
use crate::config::SecurityConfig;
use crate::{Error, Result};

/// A client of the HTTP side.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The common name of its verified client certificate, if it presented one.
    pub certificate: Option<String>,
    /// Whether that certificate is a node's (organizational unit
    /// [`crate::api::security::NODE_ROLE`]), which never opens the operators' side.
    pub node_certificate: bool,
}

impl Connected<IncomingStream<'_, HttpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, HttpListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections, plaintext or TLS, with their [`Peer`].
pub struct HttpListener {
    incoming: mpsc::Receiver<(Either<TcpStream, TlsStream<TcpStream>>, Peer)>,
    local: SocketAddr,
}

impl HttpListener {
    /// Accepts on `tcp` until `stop` fires, over TLS when `tls` is given.
    pub fn new(tcp: TcpListener, tls: Option<Arc<ServerConfig>>, stop: CancellationToken) -> Result<Self> {
        let local = tcp.local_addr().map_err(|e| Error::Io {
            context: "reading the HTTP listen address".into(),
            source: e,
        })?;
        let (tx, incoming) = mpsc::channel(64);
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = tokio::select! {
                    () = stop.cancelled() => break,
                    () = tx.closed() => break,
                    accepted = tcp.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, then go on.
                            tracing::warn!(error = %e, "http: accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let Some(acceptor) = acceptor.clone() else {
                    let peer = Peer {
                        addr,
                        certificate: None,
                        node_certificate: false,
                    };
                    if tx.send((Either::Left(stream), peer)).await.is_err() {
                        break;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let identity = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|leaf| crate::api::security::certificate_identity(leaf.as_ref()).ok());
                            let node_certificate = identity
                                .as_ref()
                                .is_some_and(|(_, role)| role.as_deref() == Some(crate::api::security::NODE_ROLE));
                            let peer = Peer {
                                addr,
                                certificate: identity.map(|(cn, _)| cn),
                                node_certificate,
                            };
                            let _ = tx.send((Either::Right(tls), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "http: tls handshake failed"),
                        Err(_) => tracing::debug!(%addr, "http: tls handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { incoming, local })
    }
}

impl Listener for HttpListener {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            // The accept loop stopped: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            certificate: None,
            node_certificate: false,
        })
    }
}

/// The rustls configuration of the HTTP side: the coordinator's certificate
/// and key, and, with `client_ca`, optional client certificates it signed.
pub fn server_config(security: &SecurityConfig) -> Result<Option<Arc<ServerConfig>>> {
    let (Some(cert), Some(key)) = (&security.tls_cert, &security.tls_key) else {
        return Ok(None);
    };
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::Config(format!("http: {what}: {e}"));
    let chain = pem_certificates(cert, "TLS certificate")?;
    let key_der = pem_private_key(key, "TLS key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls versions", &e))?;
    let builder = match &security.client_ca {
        Some(ca) => {
            let roots = pem_roots(ca, "client CA certificate")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad("the client CA", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| bad("the TLS certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}
