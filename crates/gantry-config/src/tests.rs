use std::io::Write;

use super::*;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn defaults_are_the_documented_ones() {
    let s = load(None, no_env(), &Overrides::new()).unwrap();
    assert_eq!(s, Settings::default());
    assert_eq!(s.train.steps, 2000);
    assert_eq!(s.train.batch_size, 64);
    assert_eq!(s.train.betas, [0.5, 0.999]);
    assert_eq!(s.model.latent_dim, 100);
    assert!(s.model.batch_norm);
    assert_eq!(s.data.dataset, Dataset::Mnist10k);
    assert_eq!(s.train.loss, Loss::Bce);
}

#[test]
fn each_layer_overrides_the_one_below() {
    let file = toml_file("[train]\nsteps = 10\nbatch_size = 8\nseed = 1\n");
    let e = env(&[
        ("GANTRY__TRAIN__BATCH_SIZE", "16"),
        ("GANTRY__TRAIN__SEED", "2"),
    ]);
    let mut o = Overrides::new();
    o.push_assignment("train.seed=3").unwrap();
    let s = load(Some(file.path()), e, &o).unwrap();
    assert_eq!(s.train.steps, 10, "file over default");
    assert_eq!(s.train.batch_size, 16, "env over file");
    assert_eq!(s.train.seed, 3, "--set over env");
}

#[test]
fn set_parses_typed_and_bare_values() {
    let mut o = Overrides::new();
    o.push_assignment("train.lr_g=1e-4").unwrap();
    o.push_assignment("train.betas=[0.9, 0.99]").unwrap();
    o.push_assignment("train.loss=hinge").unwrap();
    o.push_assignment("model.batch_norm=false").unwrap();
    let s = load(None, no_env(), &o).unwrap();
    assert_eq!(s.train.lr_g, 1e-4);
    assert_eq!(s.train.betas, [0.9, 0.99]);
    assert_eq!(s.train.loss, Loss::Hinge);
    assert!(!s.model.batch_norm);
}

#[test]
fn train_tf32_defaults_to_libtorchs_and_takes_a_bool() {
    let s = load(None, no_env(), &Overrides::new()).unwrap();
    assert!(
        s.train.tf32,
        "libtorch's defaults (TF32 cuDNN convolutions) by default"
    );
    let mut o = Overrides::new();
    o.push_assignment("train.tf32=false").unwrap();
    assert!(!load(None, no_env(), &o).unwrap().train.tf32);
    let mut o = Overrides::new();
    o.push_assignment("train.tf32=sometimes").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("tf32"), "{err}");
}

#[test]
fn env_lists_are_comma_separated() {
    let s = load(
        None,
        env(&[("GANTRY__TRAIN__BETAS", "0.0,0.9")]),
        &Overrides::new(),
    )
    .unwrap();
    assert_eq!(s.train.betas, [0.0, 0.9]);
}

#[test]
fn unknown_keys_are_named() {
    let file = toml_file("[train]\nstepz = 10\n");
    let err = load(Some(file.path()), no_env(), &Overrides::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("stepz"), "{err}");

    let err = load(
        None,
        env(&[("GANTRY__MODLE__KIND", "mlp")]),
        &Overrides::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("modle"), "{err}");

    let mut o = Overrides::new();
    o.push_assignment("samples.evry=3").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("evry"), "{err}");
}

#[test]
fn invalid_values_are_named() {
    let mut o = Overrides::new();
    o.push_assignment("train.loss=l2").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("l2") && err.contains("loss"), "{err}");

    let mut o = Overrides::new();
    o.push_assignment("train.batch_size=-3").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("batch_size"), "{err}");

    let mut o = Overrides::new();
    o.push_assignment("train.steps=0").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("train.steps"), "{err}");

    let mut o = Overrides::new();
    o.push_assignment("train.betas=[0.5, 1.5]").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("train.betas"), "{err}");
}

#[test]
fn malformed_and_missing_files_name_the_file() {
    let file = toml_file("[train\nsteps = ");
    let err = load(Some(file.path()), no_env(), &Overrides::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&file.path().display().to_string()), "{err}");

    let missing = Path::new("/nonexistent/gantry.toml");
    let err = load(Some(missing), no_env(), &Overrides::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/gantry.toml"), "{err}");
}

#[test]
fn bad_assignments_are_refused() {
    for arg in ["train.steps", "=3", "train..steps=3", ".steps=1"] {
        assert!(Overrides::new().push_assignment(arg).is_err(), "{arg}");
    }
}

#[test]
fn toml_round_trips_and_fingerprint_ignores_run() {
    let mut s = Settings::default();
    s.train.steps = 77;
    let text = s.to_toml().unwrap();
    let file = toml_file(&text);
    let back = load(Some(file.path()), no_env(), &Overrides::new()).unwrap();
    assert_eq!(back, s);

    let mut elsewhere = s.clone();
    elsewhere.run.dir = "/somewhere/else".into();
    elsewhere.run.device = DeviceChoice::Cpu;
    elsewhere.train.threads = 3;
    assert_eq!(s.fingerprint(), elsewhere.fingerprint());
    let mut other = s.clone();
    other.train.lr_d = s.train.lr_d / 2.0;
    assert_ne!(s.fingerprint(), other.fingerprint());
}

#[test]
fn shipped_configs_load() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(configs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(Some(&path), no_env(), &Overrides::new())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1);
}

#[test]
fn dataset_strings_round_trip_including_folders() {
    for text in [
        "mnist-10k",
        "mnist",
        "fashion-mnist",
        "folder:/data/faces",
        "folder:rel/dir",
    ] {
        let parsed: Dataset = text.parse().unwrap();
        assert_eq!(parsed.to_string(), text);
        let json = serde_json::to_string(&parsed).unwrap();
        assert_eq!(json, format!("{text:?}"));
        assert_eq!(serde_json::from_str::<Dataset>(&json).unwrap(), parsed);
    }
    assert_eq!(
        "folder:/x".parse::<Dataset>().unwrap(),
        Dataset::Folder("/x".into())
    );
    assert!("folder:".parse::<Dataset>().is_err());
    assert!(
        "cifar"
            .parse::<Dataset>()
            .unwrap_err()
            .contains("folder:PATH")
    );
}

#[test]
fn folder_dataset_and_image_shape_through_the_layers() {
    let mut o = Overrides::new();
    o.push_assignment("data.dataset=folder:/tmp/faces").unwrap();
    o.push_assignment("data.image_size=32").unwrap();
    o.push_assignment("data.channels=3").unwrap();
    let s = load(None, no_env(), &o).unwrap();
    assert_eq!(s.data.dataset, Dataset::Folder("/tmp/faces".into()));
    assert_eq!(s.data.image_shape(), [3, 32, 32]);
    let text = s.to_toml().unwrap();
    assert!(text.contains("dataset = \"folder:/tmp/faces\""), "{text}");
    let back: Settings = toml::from_str(&text).unwrap();
    assert_eq!(back, s);
}

#[test]
fn engine_keys_are_validated_by_name() {
    for (arg, key) in [
        ("train.n_critic=0", "train.n_critic"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("train.gp_weight=-1", "train.gp_weight"),
        ("train.max_nonfinite=0", "train.max_nonfinite"),
        ("data.channels=2", "data.channels"),
        ("data.image_size=32", "data.image_size"),
    ] {
        let mut o = Overrides::new();
        o.push_assignment(arg).unwrap();
        let err = load(None, no_env(), &o).unwrap_err().to_string();
        assert!(err.contains(key), "{arg}: {err}");
    }
    let mut o = Overrides::new();
    o.push_assignment("train.loss=wgan-gp").unwrap();
    o.push_assignment("model.kind=dcgan").unwrap();
    let s = load(None, no_env(), &o).unwrap();
    assert_eq!(
        (s.train.loss, s.model.kind),
        (Loss::WganGp, ModelKind::Dcgan)
    );
    assert_eq!(
        (s.train.gp_weight, s.train.n_critic, s.train.ema_decay),
        (10.0, 1, 0.999)
    );
}

#[test]
fn the_gan_is_the_default_family_and_its_keys_are_its_own() {
    let s = load(None, std::iter::empty(), &Overrides::new()).unwrap();
    assert_eq!(s.model.family, Family::Gan);
    assert_eq!(s.train.batch_size, 64);

    let mut o = Overrides::new();
    o.push_assignment("model.family=vae").unwrap();
    let vae = load(None, std::iter::empty(), &o).unwrap();
    assert_eq!(
        vae.train.batch_size, VAE_BATCH_SIZE,
        "the VAE's own default batch"
    );
    o.push_assignment("train.batch_size=32").unwrap();
    assert_eq!(
        load(None, std::iter::empty(), &o).unwrap().train.batch_size,
        32
    );

    // A GAN key while training a VAE, a VAE key while training a GAN: each named.
    for (family, key, value, named) in [
        ("vae", "train.lr_g", "1e-4", "train.lr_g"),
        ("vae", "train.loss", "hinge", "train.loss"),
        ("autoregressive", "model.kind", "dcgan", "model.kind"),
        ("gan", "vae.latent_dim", "8", "vae"),
        ("vae", "autoregressive.channels", "8", "autoregressive"),
    ] {
        let mut o = Overrides::new();
        o.push_assignment(&format!("model.family={family}"))
            .unwrap();
        o.push_assignment(&format!("{key}={value}")).unwrap();
        let err = load(None, std::iter::empty(), &o).unwrap_err().to_string();
        assert!(
            err.contains(named) && err.contains("applies to"),
            "{key}: {err}"
        );
    }
    let mut o = Overrides::new();
    o.push_assignment("model.family=diffusion").unwrap();
    let err = load(None, std::iter::empty(), &o).unwrap_err().to_string();
    assert!(
        err.contains("diffusion") && err.contains("model.family"),
        "{err}"
    );
}

#[test]
fn a_complete_config_of_another_family_reads_back() {
    let mut o = Overrides::new();
    o.push_assignment("model.family=autoregressive").unwrap();
    o.push_assignment("autoregressive.channels=16").unwrap();
    let s = load(None, std::iter::empty(), &o).unwrap();
    let back = Settings::from_toml(&s.to_toml().unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn tensorboard_logging_is_on_by_default_and_set_through_every_layer() {
    let s = load(None, no_env(), &Overrides::new()).unwrap();
    assert!(s.logging.tensorboard);

    let file = toml_file("[logging]\ntensorboard = false\n");
    let s = load(Some(file.path()), no_env(), &Overrides::new()).unwrap();
    assert!(!s.logging.tensorboard, "TOML");

    let on = env(&[("GANTRY__LOGGING__TENSORBOARD", "true")]);
    let s = load(Some(file.path()), on.clone(), &Overrides::new()).unwrap();
    assert!(s.logging.tensorboard, "env over TOML");

    let mut o = Overrides::new();
    o.push_assignment("logging.tensorboard=false").unwrap();
    let s = load(Some(file.path()), on, &o).unwrap();
    assert!(!s.logging.tensorboard, "--set over env");

    // How a run is watched does not change what it trains.
    assert_eq!(s.fingerprint(), Settings::default().fingerprint());
    let back = Settings::from_toml(&s.to_toml().unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn bad_logging_values_and_keys_are_named() {
    let mut o = Overrides::new();
    o.push_assignment("logging.tensorboard=sometimes").unwrap();
    let err = load(None, no_env(), &o).unwrap_err().to_string();
    assert!(err.contains("logging.tensorboard"), "{err}");

    let err = load(
        None,
        env(&[("GANTRY__LOGGING__TENSORBOARD", "sometimes")]),
        &Overrides::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("logging.tensorboard"), "{err}");

    let file = toml_file("[logging]\ntensorbord = true\n");
    let err = load(Some(file.path()), no_env(), &Overrides::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensorbord"), "{err}");
}
