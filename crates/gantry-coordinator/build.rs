//! Lets the coordinator find NCCL (for creating the nccl backend's unique id) in the PyPI
//! layout that scripts/fetch-libtorch.sh provides, without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{libtorch}/../nvidia/nccl/lib");
    }
}
