//! Shared by the build scripts of every fedge package that links libtorch:
//! records the libtorch library folder as an rpath of the package's binaries
//! and tests, so they run without `LD_LIBRARY_PATH`.
//!
//! `LIBTORCH` comes from the environment or from `.cargo/config.toml` (which
//! points at the `.libtorch` link made by `scripts/install-libtorch.sh`). The
//! folder is canonicalized so the binaries keep working where the link is not.
//! `--disable-new-dtags` writes `DT_RPATH`, which the loader also applies to
//! libtorch's own dependencies (libcudart, libgomp) found in the same folder.

#![allow(clippy::print_stdout)] // build scripts talk to cargo on stdout

use std::path::PathBuf;

pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(root) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(root).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
