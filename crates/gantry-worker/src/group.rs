//! Where tch tensors meet the collective: gradient buckets, parameter broadcast, checks.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gantry_collective::{Collective, GradientPiece, ReduceOp, RingConfig};
use gantry_config::Settings;
use gantry_models::FlatParams;
use gantry_models::task::{ExternalError, GradReduce, TrainTask};
use tch::{Device, Kind, Tensor};

/// `collective.timeout`: every backend's bound on waiting for its peers (the ring's socket
/// timeouts, NCCL's creation and each of its operations).
pub fn collective_timeout(settings: &Settings) -> Duration {
    Duration::from_secs_f64(settings.collective.timeout)
}

/// The ring settings of `collective.*` for one rank; the caller sets the session id.
pub fn ring_config(
    settings: &Settings,
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
) -> RingConfig {
    let mut config = RingConfig::new(rank, world, peers);
    config.timeout = collective_timeout(settings);
    config.shared_memory = settings.collective.shared_memory;
    config
}

/// A rank's view of its data-parallel group.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    /// `None` for a world of one.
    collective: Option<Box<dyn Collective>>,
    /// Largest all-reduce, in f32 elements (`collective.bucket_mb`).
    bucket_elems: usize,
    /// Host staging for tensors that do not live in host memory.
    staging: Vec<f32>,
    /// Gradient all-reduce traffic since the last [`Group::take_traffic`].
    traffic: Traffic,
    /// Whether [`GradReduce::start_average`] may average in the background.
    overlap: bool,
    /// The background average in flight, if any (it holds the collective meanwhile).
    pending: Option<PendingAverage>,
    /// `Some(slice / global)` when the ranks' slices of the global batch differ in length:
    /// each gradient is scaled by it and the group sums, so the result is the global-batch
    /// mean; `None` (even slices): the plain average. See [`crate::batch`].
    gradient_weight: Option<f64>,
}

/// What the all-reduce thread hands back: the collective, the result, its seconds.
type AverageOutcome = (
    Box<dyn Collective>,
    Result<(), gantry_collective::CollectiveError>,
    f64,
);

/// An average running on a helper thread (see [`GradReduce::start_average`]).
pub struct PendingAverage {
    handle: std::thread::JoinHandle<AverageOutcome>,
    /// The tensor whose memory the thread works on.
    _keep_alive: Tensor,
    bytes: u64,
}

impl std::fmt::Debug for PendingAverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAverage")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// A host f32 buffer handed to the all-reduce thread.
struct HostF32 {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the buffer is used by one thread at a time: the all-reduce thread until it is
// joined, the training thread after (see `Group::start_average`).
unsafe impl Send for HostF32 {}

impl HostF32 {
    /// # Safety
    /// The memory is live and used by no one else for `'a`.
    unsafe fn into_slice<'a>(self) -> &'a mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Bytes and seconds of gradient all-reduces.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub bytes: u64,
    pub seconds: f64,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl Group {
    pub fn solo() -> Self {
        Self {
            rank: 0,
            world: 1,
            collective: None,
            bucket_elems: usize::MAX,
            staging: Vec::new(),
            traffic: Traffic::default(),
            overlap: false,
            pending: None,
            gradient_weight: None,
        }
    }

    pub fn new(collective: Box<dyn Collective>, bucket_mb: f64) -> Self {
        let bucket_elems = ((bucket_mb * 1024.0 * 1024.0) / 4.0).max(1024.0) as usize;
        Self {
            rank: collective.rank(),
            world: collective.world_size(),
            collective: Some(collective),
            bucket_elems,
            staging: Vec::new(),
            traffic: Traffic::default(),
            overlap: false,
            pending: None,
            gradient_weight: None,
        }
    }

    /// Without a collective, or with one of a single rank (`coordinator --workers 1`), where
    /// averaging is the identity (a weight of one slice over the same global batch is 1): no
    /// all-reduce runs, and no helper thread is started for one.
    fn alone(&self) -> bool {
        self.collective.is_none() || self.world == 1
    }

    /// Completed collective operations (for the coordinator's hang detection).
    pub fn sequence(&self) -> u64 {
        self.collective.as_ref().map_or(0, |c| c.sequence())
    }

    pub fn abort(&mut self) {
        if let Some(c) = self.collective.as_mut() {
            c.abort();
        }
    }

    /// Weights this rank's gradients by `weight` and sums them across the group from now on
    /// (`Some(slice / global)`, for uneven slices of the global batch), or averages them
    /// plainly (`None`, the default). Every rank of the group must make the same choice.
    pub fn set_gradient_weight(&mut self, weight: Option<f64>) {
        self.gradient_weight = weight;
    }

    /// See [`Group::set_gradient_weight`].
    pub fn gradient_weight(&self) -> Option<f64> {
        self.gradient_weight
    }

    /// Scales `flat` by the gradient weight, where there is one, and returns the reduction
    /// that then makes it the global-batch mean.
    fn prepare_gradient(&self, flat: &Tensor) -> ReduceOp {
        match self.gradient_weight {
            None => ReduceOp::Average,
            Some(weight) => {
                tch::no_grad(|| {
                    let _ = flat.shallow_clone().g_mul_scalar_(weight);
                });
                ReduceOp::Sum
            }
        }
    }

    /// Averages a flat f32 tensor of gradients across ranks, in place, bucket by bucket:
    /// plainly, or weighted by each rank's slice of the global batch (see
    /// [`Group::set_gradient_weight`]).
    pub fn average(&mut self, flat: &mut Tensor) -> Result<()> {
        if self.alone() {
            return Ok(());
        }
        let op = self.prepare_gradient(flat);
        let Some(collective) = self.collective.as_mut() else {
            return Ok(());
        };
        if let Device::Cuda(index) = flat.device() {
            // The device path returns once NCCL finished, so without this wait the timer
            // would also cover the backward kernels still queued ahead of it. The host waits
            // for them either way; waiting here first costs one launch latency.
            tch::Cuda::synchronize(index as i64);
        }
        let started = std::time::Instant::now();
        if flat.device().is_cuda() && device_all_reduce(collective.as_mut(), flat, op)? {
            // NCCL reduced the gradient in GPU memory, on libtorch's current stream.
        } else {
            for_each_bucket(flat, self.bucket_elems, &mut self.staging, |buf| {
                collective.all_reduce_f32(buf, op)
            })?;
        }
        self.traffic.bytes += (flat.numel() * std::mem::size_of::<f32>()) as u64;
        self.traffic.seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Lets [`GradReduce::start_average`] average in the background (or not).
    pub fn set_overlap(&mut self, overlap: bool) {
        self.overlap = overlap;
    }

    /// The gradient all-reduce traffic since the previous call.
    pub fn take_traffic(&mut self) -> Traffic {
        std::mem::take(&mut self.traffic)
    }

    /// Overwrites a flat f32 tensor on every rank with rank 0's: in GPU memory when the
    /// tensor lives there and the backend can (NCCL), else staged through host memory.
    pub fn broadcast(&mut self, flat: &mut Tensor) -> Result<()> {
        let Some(collective) = self.collective.as_mut() else {
            return Ok(());
        };
        if flat.device().is_cuda() && device_broadcast(collective.as_mut(), flat)? {
            return Ok(());
        }
        for_each_bucket(flat, self.bucket_elems, &mut self.staging, |buf| {
            collective.broadcast_f32(buf, 0)
        })
    }

    /// Replaces `bytes` everywhere with rank 0's.
    pub fn broadcast_bytes(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        match self.collective.as_mut() {
            Some(c) => c.broadcast_bytes(bytes, 0).context("broadcast"),
            None => Ok(()),
        }
    }

    /// Sums small host vectors across ranks.
    pub fn sum_host(&mut self, values: &mut [f32]) -> Result<()> {
        match self.collective.as_mut() {
            Some(c) => c
                .all_reduce_f32(values, ReduceOp::Sum)
                .context("all-reduce"),
            None => Ok(()),
        }
    }

    /// Before step 1: every rank checks that it built the same networks as rank 0 (names,
    /// shapes, dtypes), then takes rank 0's parameters and buffers, so all ranks start equal.
    pub fn synchronise_start(&mut self, task: &dyn TrainTask) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        for part in task.parts() {
            let label = part.name;
            let ours = signature_text(part.params);
            let mut theirs = ours.clone().into_bytes();
            self.broadcast_bytes(&mut theirs)?;
            let theirs = String::from_utf8_lossy(&theirs).into_owned();
            if theirs != ours {
                let first = ours
                    .lines()
                    .zip(theirs.lines())
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| format!("rank {} has `{a}`, rank 0 has `{b}`", self.rank))
                    .unwrap_or_else(|| {
                        format!("rank {} and rank 0 differ in tensor count", self.rank)
                    });
                bail!("{label} differs between ranks: {first}");
            }
        }
        self.broadcast_state(task)
    }

    /// Copies rank 0's parameters and non-trainable buffers (BatchNorm running statistics)
    /// to every rank. Gradients are averaged every step, so parameters stay equal; running
    /// statistics are computed from each rank's own batches and would drift apart, so the
    /// group adopts rank 0's wherever a state is observed (checkpoints, samples, the end).
    pub fn broadcast_state(&mut self, task: &dyn TrainTask) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let parts = task.parts();
        tch::no_grad(|| -> Result<()> {
            for part in &parts {
                self.broadcast(&mut part.params.flat.shallow_clone())?;
            }
            task.parameters_written();
            for part in &parts {
                for mut buffer in gantry_models::buffers(part.vs) {
                    let mut flat = buffer.reshape([-1]).to_kind(Kind::Float);
                    self.broadcast(&mut flat)?;
                    buffer.copy_(&flat.view(buffer.size().as_slice()).to_kind(buffer.kind()));
                }
            }
            Ok(())
        })
    }

    /// Compares a checksum of every rank's parameters; a mismatch names the ranks that
    /// disagree with rank 0.
    pub fn verify_identical(&mut self, task: &dyn TrainTask, step: u64) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let checksum = |t: &Tensor| -> (f64, f64) {
            let t = t.to_kind(Kind::Double);
            (
                t.sum(None).double_value(&[]),
                (&t * &t).sum(None).double_value(&[]),
            )
        };
        let ours: Vec<f32> = task
            .parts()
            .iter()
            .flat_map(|part| {
                let (sum, sq) = checksum(&part.params.flat);
                [sum as f32, sq as f32]
            })
            .collect();
        let k = ours.len();
        // Each rank writes its figures into its own slot; a sum gathers everyone's.
        let mut table = vec![0f32; self.world * k];
        table[self.rank * k..][..k].copy_from_slice(&ours);
        self.sum_host(&mut table)?;
        let reference = &table[..k];
        let divergent: Vec<usize> = (1..self.world)
            .filter(|r| table[r * k..][..k] != *reference)
            .collect();
        if !divergent.is_empty() {
            bail!(
                "parameters diverged at step {step}: rank(s) {divergent:?} differ from rank 0 \
                 (checksums {:?} vs {reference:?})",
                divergent
                    .iter()
                    .map(|r| &table[r * k..][..k])
                    .collect::<Vec<_>>()
            );
        }
        Ok(())
    }
}

impl GradReduce for Group {
    fn average(&mut self, flat: &mut Tensor) -> Result<(), ExternalError> {
        Group::average(self, flat).map_err(Into::into)
    }

    /// Alone (see [`Group::alone`]) and with nothing in the background, [`Group::average`]
    /// returns before touching the gradient, weighting included.
    fn is_identity(&self) -> bool {
        self.alone() && self.pending.is_none()
    }

    /// Where the group sums plainly in the foreground: with a collective, no weighting (it
    /// would scale the pieces) and nothing in the background.
    fn takes_pieces(&self) -> bool {
        !self.alone() && self.gradient_weight.is_none() && !self.overlap
    }

    /// One operation for the whole gradient, the pieces moved as they are
    /// ([`Collective::all_reduce_pieces`]), where they are contiguous host f32 or bf16
    /// tensors and fit one bucket (`collective.bucket_mb`); otherwise gathered and averaged
    /// bucket by bucket as [`Group::average`] does.
    fn average_pieces(
        &mut self,
        pieces: &[Tensor],
        out: &mut Tensor,
    ) -> Result<bool, ExternalError> {
        let total: usize = pieces.iter().map(Tensor::numel).sum();
        let host = |t: &Tensor, kind: Kind| {
            t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous()
        };
        let usable = self.takes_pieces()
            && self.pending.is_none()
            && host(out, Kind::Float)
            && out.numel() == total
            && total <= self.bucket_elems
            && pieces
                .iter()
                .all(|p| host(p, Kind::Float) || host(p, Kind::BFloat16));
        let Some(collective) = self.collective.as_mut().filter(|_| usable) else {
            gantry_models::gather_pieces(pieces, out);
            Group::average(self, out)?;
            return Ok(gantry_models::all_finite(out));
        };
        // SAFETY: every piece is a contiguous host tensor of its kind (checked above), read
        // only while the slices live; `out` is a contiguous host f32 tensor of `total`
        // elements that only this call writes meanwhile.
        let (slices, target) = unsafe {
            let slices: Vec<GradientPiece<'_>> = pieces
                .iter()
                .map(|p| match p.kind() {
                    Kind::BFloat16 => GradientPiece::Bf16(std::slice::from_raw_parts(
                        p.data_ptr().cast::<u16>().cast_const(),
                        p.numel(),
                    )),
                    _ => GradientPiece::F32(std::slice::from_raw_parts(
                        p.data_ptr().cast::<f32>().cast_const(),
                        p.numel(),
                    )),
                })
                .collect();
            let target = std::slice::from_raw_parts_mut(out.data_ptr().cast::<f32>(), total);
            (slices, target)
        };
        let started = std::time::Instant::now();
        let finite = collective
            .all_reduce_pieces(&slices, target, ReduceOp::Average)
            .context("all-reduce")?;
        self.traffic.bytes += slices.iter().map(GradientPiece::bytes).sum::<usize>() as u64;
        self.traffic.seconds += started.elapsed().as_secs_f64();
        Ok(finite)
    }

    /// On a helper thread, where background averaging is on, the group has a collective
    /// and `flat` is a contiguous f32 CPU tensor. Until [`GradReduce::finish_average`] the
    /// group has no collective.
    fn start_average(&mut self, flat: &Tensor) -> bool {
        let host_f32 = flat.device() == Device::Cpu
            && flat.kind() == Kind::Float
            && flat.is_contiguous()
            && flat.dim() == 1;
        if !self.overlap || !host_f32 || self.pending.is_some() || self.alone() {
            return false;
        }
        // Scaled here, on the training thread, before the helper owns the memory.
        let op = self.prepare_gradient(flat);
        let Some(mut collective) = self.collective.take() else {
            return false;
        };
        let bucket = self.bucket_elems.max(1);
        let memory = HostF32 {
            ptr: flat.data_ptr().cast::<f32>(),
            len: flat.numel(),
        };
        let handle = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            // SAFETY: `PendingAverage` keeps the tensor alive until this thread is joined
            // (in `finish_average`, or when the group is dropped), and the caller promised
            // not to touch its memory meanwhile.
            let all = unsafe { memory.into_slice() };
            let result = all
                .chunks_mut(bucket)
                .try_for_each(|chunk| collective.all_reduce_f32(chunk, op));
            (collective, result, started.elapsed().as_secs_f64())
        });
        self.pending = Some(PendingAverage {
            handle,
            _keep_alive: flat.shallow_clone(),
            bytes: (flat.numel() * std::mem::size_of::<f32>()) as u64,
        });
        true
    }

    fn finish_average(&mut self) -> Result<(), ExternalError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let (collective, result, seconds) = pending
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the all-reduce thread panicked"))?;
        self.collective = Some(collective);
        result.context("all-reduce")?;
        self.traffic.bytes += pending.bytes;
        self.traffic.seconds += seconds;
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // The helper thread writes into a tensor the pending average keeps alive: join it
        // before that tensor can go.
        if let Some(pending) = self.pending.take() {
            let _ = pending.handle.join();
        }
    }
}

fn signature_text(params: &FlatParams) -> String {
    params
        .signature()
        .iter()
        .map(|(name, shape, kind)| format!("{name} {shape:?} {kind:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reduces (`op`) a contiguous f32 GPU tensor in place through the backend's device path
/// (one call: NCCL pipelines large buffers itself). `false` when the backend has none.
fn device_all_reduce(collective: &mut dyn Collective, flat: &Tensor, op: ReduceOp) -> Result<bool> {
    if flat.kind() != Kind::Float || !flat.is_contiguous() {
        return Ok(false);
    }
    let ptr = flat.data_ptr() as u64;
    // SAFETY: a contiguous f32 CUDA tensor of numel() elements on the communicator's device
    // (the worker trains on the device its NCCL communicator was created for). NCCL runs on
    // the stream the worker gave the collective (libtorch's current stream, the one whose
    // kernels wrote the tensor: `NcclCollective::set_device_stream` in cluster.rs), so stream
    // order puts the reduction after them and nothing else touches the buffer meanwhile.
    let done =
        unsafe { collective.all_reduce_device_f32(ptr, flat.numel(), op) }.context("all-reduce")?;
    Ok(done)
}

/// Overwrites a contiguous f32 GPU tensor with rank 0's through the backend's device path
/// (one call). `false` when the backend has none.
fn device_broadcast(collective: &mut dyn Collective, flat: &Tensor) -> Result<bool> {
    if flat.kind() != Kind::Float || !flat.is_contiguous() {
        return Ok(false);
    }
    let ptr = flat.data_ptr() as u64;
    // SAFETY: as in `device_all_reduce`: a contiguous f32 CUDA tensor of numel() elements on
    // the communicator's device, ordered behind its writers by libtorch's current stream.
    let done =
        unsafe { collective.broadcast_device_f32(ptr, flat.numel(), 0) }.context("broadcast")?;
    Ok(done)
}

/// Runs `op` on host f32 views of `flat` in buckets of at most `bucket` elements. CPU tensors
/// are reduced in place through their own memory; others are staged through the host.
fn for_each_bucket(
    flat: &mut Tensor,
    bucket: usize,
    staging: &mut Vec<f32>,
    mut op: impl FnMut(&mut [f32]) -> Result<(), gantry_collective::CollectiveError>,
) -> Result<()> {
    if flat.kind() != Kind::Float || !flat.is_contiguous() || flat.dim() != 1 {
        bail!(
            "collective buffers must be contiguous 1-D f32 tensors, got {:?} {:?}",
            flat.kind(),
            flat.size()
        );
    }
    let numel = flat.numel();
    if flat.device() == Device::Cpu {
        // SAFETY: a contiguous f32 CPU tensor of `numel` elements owns that memory, and no
        // other reference to it is used while this slice lives.
        let all = unsafe { std::slice::from_raw_parts_mut(flat.data_ptr().cast::<f32>(), numel) };
        for chunk in all.chunks_mut(bucket.max(1)) {
            op(chunk).context("all-reduce")?;
        }
    } else {
        staging.resize(numel, 0.0);
        flat.copy_data(staging, numel);
        for chunk in staging.chunks_mut(bucket.max(1)) {
            op(chunk).context("all-reduce")?;
        }
        tch::no_grad(|| flat.copy_(&Tensor::from_slice(staging).to_device(flat.device())));
    }
    Ok(())
}
