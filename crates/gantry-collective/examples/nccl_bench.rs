//! NCCL all-reduce on this machine's GPUs through Gantry's backend: correctness and
//! bandwidth, one rank (scripts/gpu-bench.sh runs it). Needs libnccl.so on the loader path
//! and a CUDA GPU; prints one line per size: `nccl <MiB> <algbw GB/s> <median ms> <ok>`.

use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, DevicePtrMut};
use gantry_collective::ReduceOp;
use gantry_collective::nccl::{
    DeviceDType, NcclCollective, NcclId, cuda_device_count, nccl_library_present,
};

fn main() {
    if !nccl_library_present() {
        eprintln!("nccl_bench: libnccl.so is not on the loader path");
        std::process::exit(2);
    }
    match cuda_device_count() {
        Ok(n) if n > 0 => {}
        other => {
            eprintln!("nccl_bench: no CUDA device ({other:?})");
            std::process::exit(2);
        }
    }
    let id = NcclId::new().expect("ncclGetUniqueId");
    let mut nccl = NcclCollective::new(0, 1, id.as_bytes(), 0, Duration::from_secs(60))
        .expect("ncclCommInitRankConfig");
    let ctx = CudaContext::new(0).expect("CUDA context");
    let stream = ctx.new_stream().expect("stream");
    for mib in [1usize, 4, 16, 64, 256] {
        let len = mib * (1 << 20) / 4;
        let host: Vec<f32> = (0..len).map(|i| (i % 251) as f32 * 0.5).collect();
        let mut dev = stream.clone_htod(&host).expect("copy to device");
        let mut times = Vec::new();
        for _ in 0..12 {
            let (ptr, _sync) = dev.device_ptr_mut(&stream);
            let started = Instant::now();
            // SAFETY: `dev` holds `len` f32s on device 0 and is only used on `stream`.
            unsafe {
                nccl.all_reduce_device(
                    ptr,
                    len,
                    DeviceDType::F32,
                    ReduceOp::Sum,
                    stream.cu_stream().cast(),
                )
            }
            .expect("ncclAllReduce");
            stream.synchronize().expect("synchronize");
            times.push(started.elapsed().as_secs_f64());
        }
        // World 1: the sum is the input itself.
        let back = stream.clone_dtoh(&dev).expect("copy back");
        let ok = back == host;
        times.drain(..2);
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = (len * 4) as f64;
        println!(
            "nccl\t{mib}\t{:.1}\t{:.3}\t{}",
            bytes / median / 1e9,
            median * 1e3,
            if ok { "ok" } else { "WRONG" }
        );
        assert!(ok, "all-reduce of {mib} MiB changed the data");
    }
}
