//! The small HTTP/1.1 client behind `coordinator health` and `coordinator
//! status` (containers have no other): plaintext, or TLS (rustls) that
//! checks the coordinator's certificate against a given CA, and presents an
//! operator's bearer token or client certificate when given one.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::Status;
use crate::api::security::{pem_certificates, pem_private_key, pem_roots};
use crate::{Error, Result};

/// How to reach the coordinator's HTTP side.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub timeout: Duration,
    /// The CA (PEM) that signed the coordinator's certificate (`https://`).
    pub ca: Option<PathBuf>,
    /// Do not check the coordinator's certificate (`https://`): for health
    /// checks of a local process, which send no credentials.
    pub skip_verify: bool,
    /// An operator's bearer token.
    pub token: Option<String>,
    /// An operator's client certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientOptions {
    /// Plaintext or unverified TLS, no credentials: what a health check needs.
    pub fn plain(timeout: Duration) -> Self {
        Self {
            timeout,
            ca: None,
            skip_verify: false,
            token: None,
            cert: None,
            key: None,
        }
    }

    fn tls_config(&self) -> Result<ClientConfig> {
        let bad = |what: String, e: &dyn std::fmt::Display| Error::Config(format!("{what}: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls versions".into(), &e))?;
        let builder = match (&self.ca, self.skip_verify) {
            (_, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
            (Some(ca), false) => builder.with_root_certificates(pem_roots(ca, "CA certificate")?),
            (None, false) => {
                return Err(Error::Config(
                    "an https:// URL needs --ca FILE, the CA that signed the coordinator's certificate \
                     (ca.pem of `coordinator certs`)"
                        .into(),
                ));
            }
        };
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    pem_certificates(cert, "client certificate")?,
                    pem_private_key(key, "client key")?,
                )
                .map_err(|e| bad("the client certificate and key".into(), &e))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(Error::Config("--cert and --key go together".into())),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// What [`request`] got back.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub code: u16,
    pub status_line: String,
    /// The body, trimmed.
    pub body: String,
}

/// One HTTP/1.1 request to `url` (`http://` or `https://host:port/path`)
/// with `body` (sent with its length when not empty).
pub fn request(method: &str, url: &str, body: &[u8], opts: &ClientOptions) -> Result<Answer> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(Error::Config(format!(
            "expected an http:// or https:// URL, got `{url}`"
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let io = |context: String| move |e: std::io::Error| Error::Io { context, source: e };
    let addr = authority
        .to_socket_addrs()
        .map_err(io(format!("resolving {authority}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("{authority} resolves to no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, opts.timeout).map_err(io(format!("connecting to {addr}")))?;
    tcp.set_read_timeout(Some(opts.timeout))
        .map_err(io("setting a timeout".into()))?;
    tcp.set_write_timeout(Some(opts.timeout))
        .map_err(io("setting a timeout".into()))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    if let Some(token) = &opts.token {
        head += &format!("Authorization: Bearer {}\r\n", token.trim());
    }
    if !body.is_empty() {
        head += &format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head += "\r\n";
    let answer = if tls {
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| Error::Config(format!("`{host}` is not a host name: {e}")))?;
        let conn = rustls::ClientConnection::new(Arc::new(opts.tls_config()?), name)
            .map_err(|e| Error::Config(format!("tls: {e}")))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        exchange(&mut stream, head.as_bytes(), body).map_err(|e| tls_error(e, &format!("https://{authority}")))?
    } else {
        let mut stream = tcp;
        exchange(&mut stream, head.as_bytes(), body).map_err(io(format!("talking to http://{authority}")))?
    };
    if answer.is_empty() {
        let hint = if tls { "" } else { " (does it serve https://?)" };
        return Err(Error::Internal(format!(
            "{authority} closed the connection without answering{hint}"
        )));
    }
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default().to_string();
    if tls_record(&answer) {
        return Err(Error::Config(format!(
            "http://{authority} answered in TLS: use https:// (and --ca)"
        )));
    }
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
    Ok(Answer {
        code,
        status_line,
        body: body.to_string(),
    })
}

/// Writes the request, reads the answer to its end (at most 16 MiB).
fn exchange(stream: &mut (impl Read + Write), head: &[u8], body: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(head)?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut answer = Vec::new();
    match stream.take(16 << 20).read_to_end(&mut answer) {
        Ok(_) => Ok(answer),
        // A server that closes without TLS's close_notify, after answering.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => Ok(answer),
        Err(e) => Err(e),
    }
}

/// Whether a plaintext answer is a TLS alert (a TLS server spoken to in plaintext).
fn tls_record(answer: &str) -> bool {
    answer.as_bytes().first() == Some(&0x15) || answer.as_bytes().first() == Some(&0x16)
}

fn tls_error(e: std::io::Error, base: &str) -> Error {
    let detail = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => format!(
            "the coordinator's certificate is not trusted ({c:?}); is --ca the CA that signed it, \
             and the URL's host one it was issued for?"
        ),
        Some(other) => format!("tls: {other}"),
        None => e.to_string(),
    };
    Error::Config(format!("talking to {base}: {detail}"))
}

/// Accepts any server certificate (still checking the handshake's signatures).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// GETs `url` and returns the body of a 200 answer; any other answer is an
/// error naming the status and the server's reason.
pub fn check(url: &str, opts: &ClientOptions) -> Result<String> {
    let answer = request("GET", url, &[], opts)?;
    if answer.code == 200 {
        Ok(answer.body)
    } else {
        let hint = match answer.code {
            401 => " (give an operator token: --token-file FILE or FEDGE_OPERATOR_TOKEN; or --cert/--key)",
            _ => "",
        };
        Err(Error::Internal(format!(
            "{url} answered `{}`: {}{hint}",
            answer.status_line, answer.body
        )))
    }
}

/// Reads `/api/status` from the coordinator's HTTP address `base`
/// (`http[s]://host:port`).
pub fn fetch_status(base: &str, opts: &ClientOptions) -> Result<Status> {
    let url = format!("{}/api/status", base.trim_end_matches('/'));
    let body = check(&url, opts)?;
    serde_json::from_str(&body)
        .map_err(|e| Error::Internal(format!("{url} answered something other than a fedge status: {e}")))
}
