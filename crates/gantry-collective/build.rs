//! Lets this crate's tests and examples find NCCL in the PyPI layout that
//! scripts/fetch-libtorch.sh provides (`LIBTORCH/../nvidia/nccl/lib`), without
//! `LD_LIBRARY_PATH`: otherwise the NCCL tests would skip on a machine that has the library.
//! (The library itself loads NCCL at run time and links nothing.)
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let nccl = std::path::Path::new(&libtorch).join("../nvidia/nccl/lib");
        for kind in ["tests", "examples"] {
            println!("cargo:rustc-link-arg-{kind}=-Wl,-rpath,{}", nccl.display());
        }
    }
}
