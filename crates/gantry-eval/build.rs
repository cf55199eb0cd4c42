//! Bakes libtorch's location into everything this crate links (the `gantry-eval` binary and
//! the test binaries), so they run without LD_LIBRARY_PATH. Same as gantry-models' build.rs.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its lib dir");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
