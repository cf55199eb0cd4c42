//! A Gantry worker: one process, one device, the training loop.
//!
//! `worker --standalone` trains on its own; later the same loop runs as one rank of a
//! data-parallel cluster. The loop itself is device- and world-agnostic: each global step's
//! data indices and latents are pure functions of (seed, step), sliced by rank.
//!
//! - [`train`]: the loop (data → step → metrics → samples → summary).
//! - [`batch`]: how the ranks present share each step's global batch (uneven slices
//!   included), and the weights that keep the averaged gradient the global-batch mean.
//! - [`checkpoint`]: crash-safe checkpoints, and finding the one to resume from.
//! - [`run_dir`]: the files a run leaves behind, written atomically.
//! - [`samples`]: the 8×8 sample grid as PNG.
//! - [`tensorboard`]: the run's figures and sample grids as TensorBoard event files.
//! - [`endpoint`]: the HTTP endpoint of probes and `/metrics`.
//! - [`progress`]: a progress bar on a terminal, plain log lines elsewhere.
//! - [`group`]: a rank's data-parallel [`group::Group`]: gradient buckets, parameter
//!   broadcast and start-up checks over the collective.
//! - [`cluster`]: one session with a coordinator (connect, join, train, report).

pub mod batch;
pub mod checkpoint;
pub mod cluster;
pub mod endpoint;
pub mod group;
pub mod progress;
pub mod run_dir;
pub mod samples;
pub mod tensorboard;
pub mod train;
