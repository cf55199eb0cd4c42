//! The elastic-membership settings, resolved once at start-up against the requested worker
//! count.
//!
//! Hidden contract with the workers: the configuration the coordinator hands out always has
//! a non-zero `train.global_batch_size` (`batch_size ×` the requested count when the user
//! left it 0). Every generation, a shrunken one included, splits that same global batch
//! over its ranks, so its averaged gradient is the full group's. The resolved value is also
//! what rank 0 writes to `RUN_DIR/config.toml`, so a `--resume` (even with another worker
//! count) keeps training the same global batch.

use anyhow::{Result, bail};
use gantry_config::Settings;

/// Resolves `train.global_batch_size` in `settings` and returns `cluster.min_workers`
/// resolved to `1..=world` (0 means `world`: the group never shrinks). Refuses, naming the
/// key, a `min_workers` above the requested count and a global batch smaller than it.
pub fn resolve(settings: &mut Settings, world: u32) -> Result<u32> {
    let min_workers = match settings.cluster.min_workers {
        0 => world,
        n if n > world => bail!(
            "cluster.min_workers = {n} exceeds the requested worker count {world} \
             (--workers / --expect-workers)"
        ),
        n => n,
    };
    let train = &mut settings.train;
    if train.global_batch_size == 0 {
        train.global_batch_size = train.batch_size * world as usize;
    }
    if train.global_batch_size < world as usize {
        bail!(
            "train.global_batch_size = {} is smaller than the requested worker count {world}: \
             every rank needs at least one image per step",
            train.global_batch_size
        );
    }
    Ok(min_workers)
}

/// The fingerprint of `resolved` spelt with `train.global_batch_size = 0`, when that
/// spelling means the same global batch (`batch_size × world`): what a worker sends whose
/// own configuration leaves the key at its default.
pub fn unresolved_fingerprint(resolved: &Settings, world: u32) -> Option<String> {
    let train = &resolved.train;
    if train.global_batch_size != train.batch_size * world as usize {
        return None;
    }
    let mut unresolved = resolved.clone();
    unresolved.train.global_batch_size = 0;
    Some(unresolved.fingerprint())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_batch_is_resolved_and_bad_counts_are_refused_by_name() {
        let mut settings = Settings::default();
        settings.train.batch_size = 16;
        assert_eq!(
            resolve(&mut settings, 3).unwrap(),
            3,
            "0 = the requested count"
        );
        assert_eq!(settings.train.global_batch_size, 48);

        // A worker whose configuration says 0 trains the same job; one that says 48 too.
        let user = {
            let mut s = settings.clone();
            s.train.global_batch_size = 0;
            s
        };
        assert_eq!(
            unresolved_fingerprint(&settings, 3),
            Some(user.fingerprint())
        );
        assert_ne!(user.fingerprint(), settings.fingerprint());
        // 0 would mean 32 with two workers: not the same job.
        assert_eq!(unresolved_fingerprint(&settings, 2), None);

        let mut elastic = Settings::default();
        elastic.cluster.min_workers = 2;
        elastic.train.global_batch_size = 12;
        assert_eq!(resolve(&mut elastic, 3).unwrap(), 2);
        assert_eq!(
            elastic.train.global_batch_size, 12,
            "an explicit value stays"
        );

        let mut too_many = Settings::default();
        too_many.cluster.min_workers = 4;
        let err = resolve(&mut too_many, 3).unwrap_err().to_string();
        assert!(
            err.contains("cluster.min_workers = 4") && err.contains("3"),
            "{err}"
        );

        let mut too_small = Settings::default();
        too_small.train.global_batch_size = 2;
        let err = resolve(&mut too_small, 3).unwrap_err().to_string();
        assert!(err.contains("train.global_batch_size = 2"), "{err}");
    }
}
