//! The settings shipped for containers (`deploy/docker/*.toml`, baked into
//! the images) and for Kubernetes (the ConfigMaps in `deploy/k8s/`) load
//! with the daemons' own loaders and say what the compose file and the
//! manifests expect: ports, mounts, TLS files, state folders.

use std::path::{Path, PathBuf};

use coordinator::CoordinatorConfig;
use edge_node::NodeConfig;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The block scalar `key: |` of a ConfigMap in `manifest`, unindented.
fn configmap_file(manifest: &str, key: &str) -> String {
    let text = std::fs::read_to_string(repo().join(manifest)).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines.next().unwrap_or_else(|| panic!("{manifest} has no `{key}: |`"));
    let indent = head.len() - head.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn coordinator_from(toml: &str) -> CoordinatorConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, toml).unwrap();
    CoordinatorConfig::load_with_env(Some(&path), Vec::new(), &[]).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn node_from(toml: &str) -> NodeConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge-node.toml");
    std::fs::write(&path, toml).unwrap();
    let env = vec![("FEDGE_NODE_NAME".to_string(), "node-7".to_string())];
    NodeConfig::load_with_env(Some(&path), env, &[]).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn check_coordinator(c: &CoordinatorConfig) {
    assert_eq!(c.listen.to_string(), "0.0.0.0:7070");
    assert_eq!(c.http.listen.map(|a| a.to_string()).as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(c.out_dir, Path::new("/var/lib/fedge/run"));
    assert_eq!(c.data.path.as_deref(), Some(Path::new("/data")));
    assert!(!c.security.insecure, "containers run with TLS");
    assert_eq!(
        c.security.tls_cert.as_deref(),
        Some(Path::new("/etc/fedge/pki/coordinator.pem"))
    );
    assert_eq!(
        c.security.client_ca.as_deref(),
        Some(Path::new("/etc/fedge/pki/ca.pem"))
    );
    assert!(c.checkpoint.resume);
}

fn check_node(n: &NodeConfig) {
    assert_eq!(n.name, "node-7", "the name comes from FEDGE_NODE_NAME");
    assert!(n.coordinator.starts_with("https://"));
    assert_eq!(n.data.path.as_deref(), Some(Path::new("/data")));
    assert!(n.state_dir.is_some(), "the health check reads state_dir/heartbeat");
    assert_eq!(n.security.cert.as_deref(), Some(Path::new("/etc/fedge/pki/cert.pem")));
}

#[test]
fn container_settings_load() {
    let c = coordinator_from(&std::fs::read_to_string(repo().join("deploy/docker/coordinator.toml")).unwrap());
    check_coordinator(&c);
    let n = node_from(&std::fs::read_to_string(repo().join("deploy/docker/edge-node.toml")).unwrap());
    check_node(&n);
    assert_eq!(n.state_dir.as_deref(), Some(Path::new("/var/lib/fedge")));
    assert_eq!(n.security.server_name.as_deref(), Some("coordinator"));
}

#[test]
fn kubernetes_settings_load() {
    let c = coordinator_from(&configmap_file("deploy/k8s/coordinator.yaml", "coordinator.toml"));
    check_coordinator(&c);
    let n = node_from(&configmap_file("deploy/k8s/edge-node.yaml", "edge-node.toml"));
    check_node(&n);
    // The probe in the DaemonSet reads the heartbeat where the node writes it.
    let manifest = std::fs::read_to_string(repo().join("deploy/k8s/edge-node.yaml")).unwrap();
    let state = n.state_dir.unwrap().display().to_string();
    assert!(
        manifest.contains(&format!("\"--state-dir\", \"{state}\"")),
        "probe and state_dir differ"
    );
    assert!(
        manifest.contains(&format!("mountPath: {state}")),
        "state_dir is not on a volume"
    );
}

#[test]
fn compose_file_matches_the_container_settings() {
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    for mount in [
        ":/var/lib/fedge/run",
        ":/etc/fedge/pki/coordinator.pem:ro",
        "/data/node-4:/data:ro",
        "/pki/nodes/node-4:/etc/fedge/pki:ro",
        "/state/node-4:/var/lib/fedge",
    ] {
        assert!(compose.contains(mount), "docker-compose.yml lacks the mount {mount}");
    }
    for port in ["7070\"", "8080\""] {
        assert!(compose.contains(port), "docker-compose.yml does not publish {port}");
    }
}
