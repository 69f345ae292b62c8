//! Build script of every package that links libtorch (`fedge-learn` and the
//! binaries and tests above it): records libtorch's rpath (see
//! `libtorch_rpath.rs`).

#[path = "libtorch_rpath.rs"]
mod libtorch_rpath;

fn main() {
    libtorch_rpath::emit();
}
