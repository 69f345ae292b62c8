//! Build script of the packages that only link libtorch (see `libtorch_rpath.rs`).

#[path = "libtorch_rpath.rs"]
mod libtorch_rpath;

fn main() {
    libtorch_rpath::emit();
}
