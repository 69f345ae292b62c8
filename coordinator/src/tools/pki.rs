//! A development PKI (`coordinator certs`): a CA, the coordinator's server
//! certificate, and per node a client certificate (common name = node
//! name) and a bearer token, with the coordinator's token file holding only
//! the tokens' hashes. Production fleets bring their own CA; the layout is
//! the same.
//!
//! ```text
//! DIR/ca.pem  ca.key                 the CA (keep ca.key offline)
//! DIR/coordinator.pem coordinator.key   server certificate for `hosts`
//! DIR/tokens.toml                    node name = "sha256:…" (coordinator side)
//! DIR/nodes/NAME/{ca.pem,cert.pem,key.pem,token}   what node NAME needs
//! DIR/operators.toml                 operator = "sha256:…" (`http.operators`)
//! DIR/operator/{ca.pem,cert.pem,key.pem,token}     what the operator needs
//! ```
//!
//! The operator's credentials open the coordinator's HTTP side (dashboard,
//! `coordinator status`, `/metrics`) when it authenticates: its token, or
//! its client certificate (common name `operator`, so no node may be named
//! so).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fedge_common::security::{hash_token, new_token};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::{Error, Result};

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub tokens: PathBuf,
    /// The operators' token hashes (`http.operators`).
    pub operators: PathBuf,
    /// The operator's folder (`ca.pem`, `cert.pem`, `key.pem`, `token`).
    pub operator: PathBuf,
    /// Per node: its folder (`ca.pem`, `cert.pem`, `key.pem`, `token`).
    pub nodes: Vec<(String, PathBuf)>,
}

impl Pki {
    /// The files of an existing PKI folder (as [`generate`] lays it out).
    pub fn at(dir: &Path, nodes: &[String]) -> Self {
        Self {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("coordinator.pem"),
            server_key: dir.join("coordinator.key"),
            tokens: dir.join("tokens.toml"),
            operators: dir.join("operators.toml"),
            operator: dir.join(OPERATOR),
            nodes: nodes.iter().map(|n| (n.clone(), dir.join("nodes").join(n))).collect(),
        }
    }
}

fn rc(e: rcgen::Error) -> Error {
    Error::Config(format!("generating certificates: {e}"))
}

fn write(path: &Path, data: &[u8], secret: bool) -> Result<()> {
    Ok(fedge_common::fsutil::write_atomic_mode(
        path,
        data,
        if secret { 0o600 } else { 0o644 },
    )?)
}

/// Writes a CA, a server certificate valid for `hosts` (DNS names or IP
/// addresses) and a certificate plus token for each of `nodes` into `dir`.
/// Refuses to overwrite an existing CA.
pub fn generate(dir: &Path, hosts: &[String], nodes: &[String]) -> Result<Pki> {
    if dir.join("ca.pem").exists() {
        return Err(Error::Config(format!(
            "{} already holds a CA (ca.pem); choose another folder or remove it first",
            dir.display()
        )));
    }
    if hosts.is_empty() {
        return Err(Error::Config(
            "the coordinator's certificate needs at least one host name".into(),
        ));
    }
    check_names(nodes)?;
    std::fs::create_dir_all(dir.join("nodes")).map_err(|e| Error::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let pki = Pki::at(dir, nodes);

    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fedge development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
    let ca_pem = ca_cert.pem();
    write(&pki.ca, ca_pem.as_bytes(), false)?;
    write(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut server = CertificateParams::default();
    server.distinguished_name.push(DnType::CommonName, "fedge coordinator");
    for h in hosts {
        server.subject_alt_names.push(match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.clone().try_into().map_err(rc)?),
        });
    }
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().map_err(rc)?;
    let server_cert = server.signed_by(&server_key, &issuer).map_err(rc)?;
    write(&pki.server_cert, server_cert.pem().as_bytes(), false)?;
    write(&pki.server_key, server_key.serialize_pem().as_bytes(), true)?;

    let mut tokens = String::from(
        "# fedge node tokens, stored hashed: node name = \"sha256:<hex of SHA-256(token)>\".\n\
         # Point security.tokens at this file (with security.node_auth = \"token\").\n[nodes]\n",
    );
    for (name, folder) in &pki.nodes {
        tokens.push_str(&issue_node(&issuer, &ca_pem, name, folder)?);
    }
    write(&pki.tokens, tokens.as_bytes(), false)?;
    let operators = format!(
        "# fedge operators, stored hashed: name = \"sha256:<hex of SHA-256(token)>\". A listed\n\
         # operator's token, or a client certificate of this CA issued to the name, opens the\n\
         # coordinator's HTTP side. Point http.operators at this file.\n[operators]\n{}",
        issue(
            &issuer,
            &ca_pem,
            OPERATOR,
            crate::api::security::OPERATOR_ROLE,
            &pki.operator
        )?
    );
    write(&pki.operators, operators.as_bytes(), false)?;
    Ok(pki)
}

/// The name of the operator `generate` makes credentials for.
pub const OPERATOR: &str = "operator";

/// Writes node `name`'s certificate, key, CA copy and token into `folder`;
/// returns its line for the token file.
fn issue_node(issuer: &Issuer<'_, KeyPair>, ca_pem: &str, name: &str, folder: &Path) -> Result<String> {
    issue(issuer, ca_pem, name, crate::api::security::NODE_ROLE, folder)
}

/// Writes a client certificate for `name` in `role` (its organizational
/// unit), key, CA copy and token into `folder`; returns its token line.
fn issue(issuer: &Issuer<'_, KeyPair>, ca_pem: &str, name: &str, role: &str, folder: &Path) -> Result<String> {
    std::fs::create_dir_all(folder).map_err(|e| Error::Io {
        context: format!("creating {}", folder.display()),
        source: e,
    })?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationalUnitName, role);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(rc)?;
    let cert = p.signed_by(&key, issuer).map_err(rc)?;
    write(&folder.join("cert.pem"), cert.pem().as_bytes(), false)?;
    write(&folder.join("key.pem"), key.serialize_pem().as_bytes(), true)?;
    write(&folder.join("ca.pem"), ca_pem.as_bytes(), false)?;
    let token = new_token();
    write(&folder.join("token"), format!("{token}\n").as_bytes(), true)?;
    Ok(format!("{} = \"{}\"\n", toml_key(name), hash_token(&token)))
}

/// Adds `nodes` to the PKI in `dir` (made by [`generate`]): signs their
/// certificates with its CA (`ca.key` must be there) and appends their
/// token hashes to `tokens.toml`. Names already registered are refused.
pub fn add_nodes(dir: &Path, nodes: &[String]) -> Result<Pki> {
    check_names(nodes)?;
    let pki = Pki::at(dir, nodes);
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e} (is this a PKI folder?)", path.display())))
    };
    let ca_pem = read(&pki.ca)?;
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(rc)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(rc)?;
    let known = crate::api::security::load_tokens(&pki.tokens)?;
    if let Some(n) = nodes.iter().find(|n| known.contains_key(*n)) {
        return Err(Error::Config(format!(
            "node {n} is already registered in {}",
            pki.tokens.display()
        )));
    }
    let mut tokens = read(&pki.tokens)?;
    for (name, folder) in &pki.nodes {
        tokens.push_str(&issue_node(&issuer, &ca_pem, name, folder)?);
    }
    write(&pki.tokens, tokens.as_bytes(), false)?;
    Ok(pki)
}

/// Node names must be usable as folder names.
fn check_names(nodes: &[String]) -> Result<()> {
    for n in nodes {
        fedge_common::security::check_node_name(n).map_err(|e| Error::Config(format!("{e} (got {n:?})")))?;
        if n == OPERATOR {
            return Err(Error::Config(format!(
                "`{OPERATOR}` names the operator's certificate; choose another node name"
            )));
        }
    }
    Ok(())
}

/// A TOML key for `name`: bare when it can be, quoted otherwise.
fn toml_key(name: &str) -> String {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::security::load_tokens;

    #[test]
    fn writes_a_ca_server_and_node_credentials_with_hashed_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec!["node-1".to_string(), "cam.7".to_string()];
        let odd = generate(dir.path(), &["localhost".into()], &["cam 7".into()])
            .unwrap_err()
            .to_string();
        assert!(
            odd.contains("not allowed at byte 3") && odd.contains("\"cam 7\""),
            "{odd}"
        );
        let pki = generate(dir.path(), &["localhost".into(), "127.0.0.1".into()], &nodes).unwrap();
        let tokens = load_tokens(&pki.tokens).unwrap();
        assert_eq!(tokens.len(), 2);
        for (name, folder) in &pki.nodes {
            let token = std::fs::read_to_string(folder.join("token")).unwrap();
            assert!(fedge_common::security::token_matches(token.trim(), &tokens[name]));
            for f in ["ca.pem", "cert.pem", "key.pem"] {
                assert!(folder.join(f).is_file(), "{f}");
            }
            let der = pem_der(&folder.join("cert.pem"));
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap();
            assert_eq!(cn, name);
            let (_, role) = crate::api::security::certificate_identity(&der).unwrap();
            assert_eq!(role.as_deref(), Some(crate::api::security::NODE_ROLE));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The operator: a token listed in operators.toml and a client certificate.
        let operators = crate::api::security::load_operators(&pki.operators).unwrap();
        let token = std::fs::read_to_string(pki.operator.join("token")).unwrap();
        assert!(fedge_common::security::token_matches(
            token.trim(),
            &operators[OPERATOR]
        ));
        let der = pem_der(&pki.operator.join("cert.pem"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.subject().iter_common_name().next().unwrap().as_str().unwrap(),
            OPERATOR
        );
        let (_, role) = crate::api::security::certificate_identity(&der).unwrap();
        assert_eq!(role.as_deref(), Some(crate::api::security::OPERATOR_ROLE));
        let taken = add_nodes(dir.path(), &[OPERATOR.into()]).unwrap_err().to_string();
        assert!(taken.contains("names the operator's certificate"), "{taken}");
        let again = generate(dir.path(), &["localhost".into()], &nodes)
            .unwrap_err()
            .to_string();
        assert!(again.contains("already holds a CA"), "{again}");

        // Adding a node later: signed by the same CA, its token appended.
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        add_nodes(dir.path(), &["node-9".into()]).unwrap();
        let tokens = load_tokens(&pki.tokens).unwrap();
        assert_eq!(tokens.len(), 3);
        let folder = dir.path().join("nodes/node-9");
        let token = std::fs::read_to_string(folder.join("token")).unwrap();
        assert!(fedge_common::security::token_matches(token.trim(), &tokens["node-9"]));
        assert_eq!(std::fs::read(folder.join("ca.pem")).unwrap(), ca);
        let cert_der = pem_der(&folder.join("cert.pem"));
        let ca_der = pem_der(&dir.path().join("ca.pem"));
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        let dup = add_nodes(dir.path(), &["node-1".into()]).unwrap_err().to_string();
        assert!(dup.contains("node node-1 is already registered"), "{dup}");
    }

    fn pem_der(path: &Path) -> Vec<u8> {
        let text = std::fs::read_to_string(path).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes()).unwrap();
        pem.contents
    }
}
