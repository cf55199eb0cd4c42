//! A short standalone run writes every artifact of a run directory, with sane values.

use gantry_config::Settings;
use gantry_worker::run_dir::{MetricsRow, Summary};
use gantry_worker::train::run_standalone;

#[test]
fn short_run_writes_every_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.train.steps = 40;
    settings.train.batch_size = 16;
    settings.train.threads = 1;
    settings.train.log_every = 10;
    settings.samples.every = 20;
    settings.eval.samples = 200;
    settings.run.dir = dir.path().to_path_buf();

    let summary = run_standalone(&settings).unwrap();
    let root = dir.path();

    // config.toml is the effective configuration and loads back to the same settings.
    let text = std::fs::read_to_string(root.join("config.toml")).unwrap();
    assert_eq!(Settings::from_toml(&text).unwrap(), settings);

    // One metrics row per logged step, all finite, D outputs are probabilities.
    let rows: Vec<MetricsRow> = std::fs::read_to_string(root.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![10, 20, 30, 40]
    );
    for row in &rows {
        let s = |name: &str| row.statistics.get(name).copied().unwrap_or(f64::NAN);
        assert_eq!(
            row.statistics.keys().collect::<Vec<_>>(),
            ["d_fake", "d_loss", "d_real", "g_loss"],
            "the GAN's named statistics"
        );
        for value in [
            s("d_loss"),
            s("g_loss"),
            row.images_per_second,
            row.wall_seconds,
        ] {
            assert!(value.is_finite() && value >= 0.0, "{row:?}");
        }
        assert!(
            (0.0..=1.0).contains(&s("d_real")) && (0.0..=1.0).contains(&s("d_fake")),
            "{row:?}"
        );
    }

    // Sample grids at 0, 20, 40: real PNGs of the 8×8 grid with some ink in them.
    for step in [0, 20, 40] {
        let path = root.join(format!("samples/step-{step:08}.png"));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (484, 484), "{}", path.display());
        assert!(
            buf.iter().any(|&p| p > 0),
            "{} is all black",
            path.display()
        );
    }

    // summary.json matches what the run returned.
    let written: Summary =
        serde_json::from_str(&std::fs::read_to_string(root.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written, summary);
    assert_eq!(summary.steps, 40);
    assert_eq!(summary.world_size, 1);
    assert!(summary.images_per_second > 0.0);
    assert_eq!(summary.family, "gan");
    assert!(
        ["d_loss", "g_loss"]
            .iter()
            .all(|k| summary.final_statistics[*k].is_finite())
    );
    assert_eq!(
        summary.last_sample.as_deref(),
        Some("samples/step-00000040.png")
    );
}

#[test]
fn generated_images_stay_in_the_tanh_range() {
    let settings = Settings::default();
    let gan = gantry_models::Gan::new(&settings, [1, 28, 28], tch::Device::Cpu).unwrap();
    let z = gan.latents(&gantry_models::latent::fixed(1, 32, 100));
    let images = gan.generate(&z, None);
    assert_eq!(images.size(), vec![32, 1, 28, 28]);
    let (min, max) = (
        images.min().double_value(&[]),
        images.max().double_value(&[]),
    );
    assert!(
        min >= -1.0 && max <= 1.0 && max > min,
        "range [{min}, {max}]"
    );
}

#[test]
fn a_malformed_coordinator_url_is_named_before_any_connection() {
    for url in ["not-a-url", "ftp://host:7070", "http://"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--coordinator", url, "--device", "cpu"])
            .env("GANTRY__CLUSTER__TOKEN", "a-token-long-enough-for-the-test")
            .env("GANTRY__METRICS__WORKER_ADDR", "127.0.0.1:0")
            .env("GANTRY__CLUSTER__RING_PORT", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(
            stderr.contains(&format!("--coordinator {url:?} is not a URL")),
            "{url}: {stderr}"
        );
    }
}

#[test]
fn a_batch_larger_than_the_host_is_a_clear_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--standalone", "--device", "cpu", "--steps", "1"])
        .args(["--batch-size", "100000000"])
        .args(["--set", "metrics.worker_addr=127.0.0.1:0"])
        .arg("--run-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("train.batch_size = 100000000") && stderr.contains("available"),
        "{stderr}"
    );
}
