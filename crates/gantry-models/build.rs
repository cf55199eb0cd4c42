//! Bakes libtorch's location into everything this crate links (tests included), so binaries
//! run without LD_LIBRARY_PATH, tells the runtime where to find libtorch_cuda.so, and compiles
//! the small C++ shim of ATen operators tch does not expose (src/kernels.cpp).
use std::path::PathBuf;

fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its lib dir");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=GANTRY_LIBTORCH_LIB={lib}");

    let root = PathBuf::from(&lib)
        .parent()
        .expect("libtorch's lib dir has a parent")
        .to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=src/kernels.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/kernels.cpp")
        .compile("gantry_kernels");
    // dlopen/dlsym (the shim resolves libc10_cuda's stream functions at run time); part of
    // libc since glibc 2.34, a separate library before.
    println!("cargo:rustc-link-lib=dl");
}
