//! Local worker processes (`coordinator --workers N`).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How to start one generation of local workers.
#[derive(Debug)]
pub struct LocalWorkers {
    pub binary: PathBuf,
    pub coordinator_url: String,
    pub token: String,
    pub count: usize,
    pub log_dir: PathBuf,
    /// The GPUs this coordinator may hand out (see [`visible_gpus`]); each worker gets one
    /// when there are enough.
    pub gpus: Vec<String>,
    pub force_cpu: bool,
    /// The coordinator's own log format, which its workers' logs follow.
    pub log_format: gantry_metrics::logs::LogFormat,
    pub children: Vec<(String, Child)>,
}

/// The GPUs this coordinator may give its workers, as `CUDA_VISIBLE_DEVICES` entries: the
/// list it inherited when `CUDA_VISIBLE_DEVICES` is set (indices or `GPU-…` UUIDs; an
/// orchestrator or a user chose them), else one index per GPU the driver exposes (none when no
/// driver is loaded).
pub fn visible_gpus() -> Vec<String> {
    let driver = || fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |dir| dir.count());
    gpus_to_hand_out(
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        driver,
    )
}

fn gpus_to_hand_out(inherited: Option<&str>, driver_count: impl FnOnce() -> usize) -> Vec<String> {
    match inherited {
        // CUDA's own rule: the list ends at the first entry that is not a device; an empty
        // list hides every GPU.
        Some(list) => list
            .split(',')
            .map(str::trim)
            .take_while(|entry| !entry.is_empty() && !entry.starts_with('-'))
            .map(str::to_owned)
            .collect(),
        None => (0..driver_count()).map(|i| i.to_string()).collect(),
    }
}

/// The `worker` binary beside this executable, where `cargo build` and images put it.
pub fn default_worker_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the coordinator binary")?;
    let sibling = me.with_file_name("worker");
    if sibling.exists() {
        Ok(sibling)
    } else {
        anyhow::bail!(
            "no worker binary beside {} (pass --worker-bin PATH)",
            me.display()
        )
    }
}

impl LocalWorkers {
    /// Starts `count` workers for `generation`. Their output goes to `log_dir/worker-N.log`.
    pub fn spawn_generation(&mut self, generation: u64) -> Result<()> {
        fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("creating {}", self.log_dir.display()))?;
        let use_gpus = !self.force_cpu && self.gpus.len() >= self.count;
        for i in 0..self.count {
            let id = local_worker_id(generation, i);
            let log_path = self.log_dir.join(format!("worker-{i}.log"));
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            let mut command = Command::new(&self.binary);
            command
                .args(["--coordinator", &self.coordinator_url, "--worker-id", &id])
                .args(["--advertise-host", "127.0.0.1", "--supervised"])
                .args(["--log-format", &self.log_format.to_string()])
                .env("GANTRY__CLUSTER__TOKEN", &self.token)
                .env("GANTRY__CLUSTER__RING_PORT", "0")
                .env("GANTRY__METRICS__WORKER_ADDR", "127.0.0.1:0")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if use_gpus {
                command
                    .env("CUDA_VISIBLE_DEVICES", &self.gpus[i])
                    .args(["--device", "cuda"]);
            } else {
                command.args(["--device", "cpu"]);
            }
            let child = command
                .spawn()
                .with_context(|| format!("starting {}", self.binary.display()))?;
            self.children.push((id, child));
        }
        Ok(())
    }

    /// Children that exited since the last poll, with their status.
    pub fn poll_exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut exited = Vec::new();
        self.children
            .retain_mut(|(id, child)| match child.try_wait() {
                Ok(Some(status)) => {
                    exited.push((id.clone(), status));
                    false
                }
                _ => true,
            });
        exited
    }

    /// Asks every child to leave (SIGTERM), waits up to `grace`, then kills what is left.
    /// Stopped (SIGSTOP) children cannot act on SIGTERM, so SIGKILL ends them. Returns how
    /// each child ended.
    pub fn stop_all(&mut self, grace: Duration) -> Vec<(String, ExitStatus)> {
        for (_, child) in &self.children {
            signal(child, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        let mut exited = Vec::new();
        while Instant::now() < deadline && !self.children.is_empty() {
            exited.extend(self.poll_exited());
            std::thread::sleep(Duration::from_millis(50));
        }
        for (id, child) in &mut self.children {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                exited.push((id.clone(), status));
            }
        }
        self.children.clear();
        exited
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }
}

fn signal(child: &Child, signal: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on a child we own and have not reaped; no memory is involved.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// "exit status 3" or "killed by signal 9".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The id of the `index`-th local worker of `generation`: `local-g<generation>-w<index>`.
pub fn local_worker_id(generation: u64, index: usize) -> String {
    format!("local-g{generation}-w{index}")
}

/// The index of a local worker of `generation` from its id, if it is one.
pub fn local_worker_index(generation: u64, id: &str) -> Option<usize> {
    id.strip_prefix(&format!("local-g{generation}-w"))?
        .parse()
        .ok()
}

/// Local workers one core may carry (they share it: `train.threads = 0` splits the cores).
pub const WORKERS_PER_CORE: usize = 8;
/// Host memory each local worker needs at the least (libtorch, the data set, the models).
pub const WORKER_MEMORY_BYTES: u64 = 512 << 20;

/// Refuses `--workers N` that this host cannot run (the cores, and the memory the kernel says
/// is available), before anything is started; `--oversubscribe` skips the check.
pub fn check_host_fits(workers: u32) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let most = cores * WORKERS_PER_CORE;
    if workers as usize > most {
        anyhow::bail!(
            "--workers {workers} is more than this host can run: {cores} core(s), at most \
             {most} local workers ({WORKERS_PER_CORE} per core); pass --oversubscribe to start \
             them anyway"
        );
    }
    if let Some(available) = gantry_store::host::available_memory_bytes() {
        let needed = u64::from(workers) * WORKER_MEMORY_BYTES;
        if needed > available {
            anyhow::bail!(
                "--workers {workers} needs about {} MiB of memory ({} MiB each), this host has \
                 {} MiB available; pass --oversubscribe to start them anyway",
                needed >> 20,
                WORKER_MEMORY_BYTES >> 20,
                available >> 20
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_workers_get_the_gpus_the_coordinator_was_given() {
        let never = || panic!("the driver is not asked when the list is inherited");
        // Worker i gets the i-th inherited entry, whatever its spelling.
        assert_eq!(gpus_to_hand_out(Some("2,3"), never), ["2", "3"]);
        assert_eq!(
            gpus_to_hand_out(Some("GPU-8a1f, GPU-77c2"), never),
            ["GPU-8a1f", "GPU-77c2"]
        );
        // CUDA stops at the first entry that is no device; an empty list hides them all.
        assert_eq!(gpus_to_hand_out(Some("1,-1,0"), never), ["1"]);
        assert!(gpus_to_hand_out(Some(""), never).is_empty());
        // Nothing inherited: every GPU the driver exposes, by index.
        assert_eq!(gpus_to_hand_out(None, || 4), ["0", "1", "2", "3"]);
        assert!(gpus_to_hand_out(None, || 0).is_empty());
    }
}
