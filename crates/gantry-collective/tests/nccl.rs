//! NCCL backend tests. They need `libnccl.so` on the loader path (e.g.
//! `LD_LIBRARY_PATH=.cache/libtorch/site/nvidia/nccl/lib`) and, for the
//! device tests, a CUDA GPU; without them they print why and skip, unless
//! `GANTRY_REQUIRE_GPU=1`, where every skip is a failure.

use gantry_collective::nccl::{
    DeviceDType, NCCL_ID_BYTES, NcclCollective, NcclId, cuda_device_count, nccl_library_present,
};
use std::time::{Duration, Instant};

use gantry_collective::{AbortHandle, Collective, CollectiveError, ReduceOp};

const TIMEOUT: Duration = Duration::from_secs(60);

fn gpu_count() -> usize {
    cuda_device_count().unwrap_or(0)
}

/// Whether the GPU tests can run here; if not, says why and the test returns early. On a
/// machine meant to test the GPU path (`GANTRY_REQUIRE_GPU=1`, as `scripts/gpu-smoke.sh`
/// sets) a skip would let a broken set-up pass for a tested one: there it fails instead.
fn gpu_ready() -> bool {
    if !nccl_library_present() {
        skipping("libnccl.so not found on the loader path");
        false
    } else if gpu_count() == 0 {
        skipping("no CUDA device");
        false
    } else {
        true
    }
}

fn skipping(why: &str) {
    assert!(
        std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
        "GANTRY_REQUIRE_GPU=1, but {why}"
    );
    println!("skipped: {why}");
}

#[test]
fn nccl_unique_id_is_created_without_gpu() {
    if !nccl_library_present() {
        skipping("libnccl.so not found on the loader path");
        assert!(matches!(
            NcclId::new(),
            Err(CollectiveError::NcclUnavailable(_))
        ));
        return;
    }
    let a = NcclId::new().unwrap();
    let b = NcclId::new().unwrap();
    assert!(a.as_bytes().iter().any(|&x| x != 0), "id is all zeros");
    assert_ne!(a, b, "two unique ids are equal");
    assert_eq!(NcclId::from_bytes(a.as_bytes()).unwrap(), a);
}

#[test]
fn nccl_id_bytes_must_have_the_right_length() {
    let err = NcclId::from_bytes(&[0u8; NCCL_ID_BYTES - 1]).unwrap_err();
    assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");
}

#[test]
fn nccl_collective_without_gpu_is_a_clear_error() {
    if gpu_count() > 0 {
        println!("skipped: a CUDA device is present");
        return;
    }
    let err = NcclCollective::new(0, 1, &[0u8; NCCL_ID_BYTES], 0, TIMEOUT).unwrap_err();
    assert!(
        matches!(
            err,
            CollectiveError::NcclUnavailable(_) | CollectiveError::NoCudaDevice(_)
        ),
        "{err}"
    );
    println!("as expected: {err}");
}

#[test]
fn nccl_rejects_bad_rank_before_touching_libraries() {
    let err = NcclCollective::new(1, 1, &[0u8; NCCL_ID_BYTES], 0, TIMEOUT).unwrap_err();
    assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");
}

#[test]
fn nccl_rejects_a_zero_timeout_before_touching_libraries() {
    let err = NcclCollective::new(0, 1, &[0u8; NCCL_ID_BYTES], 0, Duration::ZERO).unwrap_err();
    assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");
}

#[test]
fn nccl_creation_with_an_aborted_handle_fails_as_aborted() {
    let handle = AbortHandle::new();
    handle.abort();
    let err = NcclCollective::with_abort_handle(0, 1, &[0u8; NCCL_ID_BYTES], 0, TIMEOUT, handle)
        .unwrap_err();
    assert!(matches!(err, CollectiveError::Aborted), "{err}");
}

#[test]
fn nccl_init_with_a_missing_rank_times_out() {
    if !gpu_ready() {
        return;
    }
    // World 2, rank 1 never joins: the non-blocking creation is polled until the timeout,
    // then aborted.
    let id = NcclId::new().unwrap();
    let started = Instant::now();
    let err = NcclCollective::new(0, 2, id.as_bytes(), 0, Duration::from_secs(2)).unwrap_err();
    assert!(matches!(err, CollectiveError::NcclTimeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "returned after {:?}",
        started.elapsed()
    );
}

#[test]
fn nccl_abort_through_the_handle_fails_the_next_operation() {
    if !gpu_ready() {
        return;
    }
    let id = NcclId::new().unwrap();
    let mut c = NcclCollective::new(0, 1, id.as_bytes(), 0, TIMEOUT).unwrap();
    let handle = c.abort_handle();
    c.barrier().unwrap();
    assert_eq!(handle.sequence(), 1);
    std::thread::spawn(move || handle.abort()).join().unwrap();
    let err = c.all_reduce_f32(&mut [1.0; 16], ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, CollectiveError::Aborted), "{err}");
    assert_eq!(c.sequence(), 1, "an aborted operation does not count");
    assert!(c.abort_handle().is_aborted());
}

#[test]
fn nccl_world_one_host_ops() {
    if !gpu_ready() {
        return;
    }
    let id = NcclId::new().unwrap();
    let mut c = NcclCollective::new(0, 1, id.as_bytes(), 0, TIMEOUT).unwrap();
    let mut buf: Vec<f32> = (0..1001).map(|i| i as f32).collect();
    let orig = buf.clone();
    c.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
    assert_eq!(buf, orig);
    c.all_reduce_f32(&mut buf, ReduceOp::Average).unwrap();
    assert_eq!(buf, orig);
    let mut bytes = b"gantry".to_vec();
    c.broadcast_bytes(&mut bytes, 0).unwrap();
    assert_eq!(bytes, b"gantry");
    c.barrier().unwrap();
    assert_eq!(c.sequence(), 4);
    assert_eq!(c.abort_handle().sequence(), 4);
}

#[test]
fn nccl_world_one_device_all_reduce() {
    use cudarc::driver::{CudaContext, DevicePtrMut};
    if !gpu_ready() {
        return;
    }
    let id = NcclId::new().unwrap();
    let mut c = NcclCollective::new(0, 1, id.as_bytes(), 0, TIMEOUT).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let host: Vec<f32> = (0..4096).map(|i| (i % 17) as f32).collect();
    let mut dev = stream.clone_htod(&host).unwrap();
    {
        let (ptr, _sync) = dev.device_ptr_mut(&stream);
        // SAFETY: `dev` holds 4096 f32s on device 0 and is only used on `stream`.
        unsafe {
            c.all_reduce_device(
                ptr,
                host.len(),
                DeviceDType::F32,
                ReduceOp::Sum,
                stream.cu_stream().cast(),
            )
        }
        .unwrap();
    }
    let back = stream.clone_dtoh(&dev).unwrap();
    assert_eq!(back, host);
}

#[test]
fn nccl_world_one_device_broadcast_through_the_trait() {
    use cudarc::driver::{CudaContext, DevicePtrMut};
    if !gpu_ready() {
        return;
    }
    let id = NcclId::new().unwrap();
    let mut c = NcclCollective::new(0, 1, id.as_bytes(), 0, TIMEOUT).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    // The trait's device path uses the legacy default stream.
    let stream = ctx.default_stream();
    let host: Vec<f32> = (0..4096).map(|i| (i % 13) as f32).collect();
    let mut dev = stream.clone_htod(&host).unwrap();
    {
        let (ptr, _sync) = dev.device_ptr_mut(&stream);
        // SAFETY: `dev` holds 4096 f32s on device 0, used only on the default stream.
        let done = unsafe { c.broadcast_device_f32(ptr, host.len(), 0) }.unwrap();
        assert!(done, "NCCL has a device broadcast");
    }
    assert_eq!(stream.clone_dtoh(&dev).unwrap(), host);
    assert_eq!(c.sequence(), 1);
}

#[test]
fn nccl_trait_device_path_enqueues_on_the_stream_source() {
    use cudarc::driver::{CudaContext, DevicePtrMut};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if !gpu_ready() {
        return;
    }
    let id = NcclId::new().unwrap();
    let mut c = NcclCollective::new(0, 1, id.as_bytes(), 0, TIMEOUT).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    // A stream of the primary context that is not the default one, as libtorch's current
    // stream is once something selects a side stream.
    let stream = ctx.new_stream().unwrap();
    let raw = stream.cu_stream() as usize;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    c.set_device_stream(Box::new(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(raw as *mut std::ffi::c_void)
    }));
    let host: Vec<f32> = (0..4096).map(|i| (i % 11) as f32).collect();
    let mut dev = stream.clone_htod(&host).unwrap();
    {
        let (ptr, _sync) = dev.device_ptr_mut(&stream);
        // SAFETY: `dev` holds 4096 f32s on device 0, used only on `stream`, the source's.
        let done = unsafe { c.all_reduce_device_f32(ptr, host.len(), ReduceOp::Average) }.unwrap();
        assert!(done);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one stream lookup per operation"
    );
    assert_eq!(stream.clone_dtoh(&dev).unwrap(), host);

    // A source that cannot name a stream fails the operation, names why, and poisons it.
    c.set_device_stream(Box::new(|| Err("no CUDA here".into())));
    let mut dev = stream.clone_htod(&host).unwrap();
    let (ptr, _sync) = dev.device_ptr_mut(&stream);
    // SAFETY: as above; nothing is enqueued, the source fails first.
    let err = unsafe { c.all_reduce_device_f32(ptr, host.len(), ReduceOp::Sum) }.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no CUDA here"), "{text}");
    assert!(
        c.barrier().is_err(),
        "a failed operation poisons the collective"
    );
}
