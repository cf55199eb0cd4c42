//! Bakes libtorch's location into the worker's binaries and tests, so they run without
//! LD_LIBRARY_PATH, plus NCCL's directory in the PyPI layout, where cudarc's loader finds
//! `libnccl.so` at run time. Generates the TensorBoard event messages from
//! `proto/tensorboard.proto` with a vendored protoc, so building needs none installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its lib dir");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}/../../nvidia/nccl/lib");

    let proto = std::path::Path::new("proto/tensorboard.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed=build.rs");
    prost_build::Config::new()
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .compile_protos(&[proto], &[std::path::Path::new("proto")])?;
    Ok(())
}
