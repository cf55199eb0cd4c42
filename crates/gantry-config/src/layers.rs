//! Assembling [`Settings`] from its layers with the `config` crate.

use std::collections::HashMap;
use std::path::Path;

use config::{Config, Environment, File, FileFormat, Value, ValueKind};

use crate::{ConfigError, Settings};

/// `train.batch_size` of a VAE run that does not set one.
pub const VAE_BATCH_SIZE: usize = 128;

/// Values that override every file and environment layer: the CLI's flags first, then each
/// `--set section.key=value` in the order given.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    entries: Vec<(String, toml::Value)>,
}

impl Overrides {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` (dotted, e.g. `train.steps`) to an already typed value.
    pub fn set(&mut self, key: &str, value: impl Into<toml::Value>) -> &mut Self {
        self.entries.push((key.to_owned(), value.into()));
        self
    }

    /// Parses one `section.key=value` argument. The value is read as a TOML value when it is one
    /// (`3`, `1e-4`, `true`, `[0.5, 0.9]`, `"x"`), else taken as a bare string (`bce`).
    pub fn push_assignment(&mut self, arg: &str) -> Result<&mut Self, ConfigError> {
        let bad = || ConfigError::BadOverride {
            arg: arg.to_owned(),
        };
        let (key, raw) = arg.split_once('=').ok_or_else(bad)?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(bad());
        }
        let value = parse_loose(raw.trim());
        Ok(self.set(key, value))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn parse_loose(raw: &str) -> toml::Value {
    #[derive(serde::Deserialize)]
    struct Holder {
        v: toml::Value,
    }
    toml::from_str::<Holder>(&format!("v = {raw}"))
        .map(|holder| holder.v)
        .unwrap_or_else(|_| toml::Value::String(raw.to_owned()))
}

fn to_config_value(value: &toml::Value) -> Value {
    let kind = match value {
        toml::Value::String(s) => ValueKind::String(s.clone()),
        toml::Value::Integer(i) => ValueKind::I64(*i),
        toml::Value::Float(f) => ValueKind::Float(*f),
        toml::Value::Boolean(b) => ValueKind::Boolean(*b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(items) => ValueKind::Array(items.iter().map(to_config_value).collect()),
        toml::Value::Table(table) => ValueKind::Table(
            table
                .iter()
                .map(|(k, v)| (k.clone(), to_config_value(v)))
                .collect(),
        ),
    };
    Value::new(None, kind)
}

/// Builds the effective settings: defaults < `file` < `env` (`GANTRY__SECTION__KEY`, pass
/// `std::env::vars()`) < `overrides`; then validates them.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Settings, ConfigError> {
    let layering = |e: config::ConfigError| ConfigError::Layering(e.to_string());
    let text = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            // Parse with toml first: its errors carry line and column, the config crate's do not.
            toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            Some(text)
        }
        None => None,
    };
    let env: HashMap<String, String> = env
        .into_iter()
        .filter(|(key, _)| key.starts_with("GANTRY__"))
        .collect();
    // The user's layers, on top of `base`.
    let layered = |base: Option<Config>| -> Result<Config, ConfigError> {
        let mut builder = Config::builder();
        if let Some(base) = base {
            builder = builder.add_source(base);
        }
        if let Some(text) = &text {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix("GANTRY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("train.betas")
                .with_list_parse_key("vae.betas")
                .with_list_parse_key("autoregressive.betas")
                .with_list_parse_key("data.mirror")
                .source(Some(env.clone())),
        );
        for (key, value) in &overrides.entries {
            builder = builder
                .set_override(key.as_str(), to_config_value(value))
                .map_err(layering)?;
        }
        builder.build().map_err(layering)
    };
    let defaults = Config::try_from(&Settings::default()).map_err(layering)?;
    let mut settings: Settings = layered(Some(defaults))?
        .try_deserialize()
        .map_err(layering)?;
    // A family's own default batch where the user named none (the VAE's literature trains
    // with 128): `train.batch_size`'s default is the GAN's.
    if settings.model.family == crate::Family::Vae
        && layered(None)?.get_int("train.batch_size").is_err()
    {
        settings.train.batch_size = VAE_BATCH_SIZE;
    }
    settings.validate()?;
    Ok(settings)
}
