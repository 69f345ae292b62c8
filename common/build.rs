//! Compiles `proto/fedge/v1/*.proto` with a vendored `protoc` (no system
//! install needed).

#[allow(clippy::print_stdout)] // build scripts talk to cargo on stdout
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = std::path::Path::new("../proto");
    let protos = [proto_root.join("fedge/v1/federation.proto")];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &[proto_root.to_path_buf()])?;
    Ok(())
}
