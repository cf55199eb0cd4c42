//! Bakes libtorch's location into the worker's binaries and tests, so they run without
//! LD_LIBRARY_PATH, plus NCCL's directory in the PyPI layout, where cudarc's loader finds
//! `libnccl.so` at run time.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its lib dir");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}/../../nvidia/nccl/lib");
}
