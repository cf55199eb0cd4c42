//! Bakes libtorch's location into everything this crate links (tests included), so binaries
//! run without LD_LIBRARY_PATH, and tells the runtime where to find libtorch_cuda.so.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its lib dir");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=GANTRY_LIBTORCH_LIB={lib}");
}
