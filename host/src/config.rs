//! `wagg.toml`: the whole configuration, one section per stage.
//!
//! Every section and field has a default, so an empty file is a valid
//! configuration (the demo's). Unknown fields are refused with their name
//! and position, so a typo never silently falls back to a default.
//! `wagg config example` prints [`EXAMPLE`], every field with its default
//! and its documentation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::admin::AdminConfig;
use crate::pipeline::PipelineConfig;
use crate::router::RouterConfig;
use crate::runtime::RuntimeLimits;
use crate::sink::{FileSinkConfig, SinkConfig};
use crate::source::amqp::AmqpConfig;
use crate::source::generator::GeneratorConfig;
use crate::source::json::DecodeLimits;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[module]`: the aggregation strategy every shard runs.
    pub module: ModuleConfig,
    /// `[pipeline]`: buckets, lateness, batching, checkpoints.
    pub pipeline: PipelineConfig,
    /// `[router]`: shards, rollups, metric name.
    pub router: RouterConfig,
    /// `[runtime]`: limits of every module instance.
    pub runtime: RuntimeLimits,
    /// `[decode]`: limits on incoming messages.
    pub decode: DecodeLimits,
    /// `[source]`: where messages come from.
    pub source: SourceConfig,
    /// `[sink]`: where points go.
    pub sink: SinkConfig,
    /// `[generator]`: the traffic `wagg demo` generates.
    pub generator: GeneratorConfig,
    /// `[admin]`: the admin API and the rollout circuit breaker.
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            module: ModuleConfig::default(),
            pipeline: PipelineConfig::default(),
            router: RouterConfig::default(),
            runtime: RuntimeLimits::default(),
            decode: DecodeLimits::default(),
            source: SourceConfig::default(),
            sink: SinkConfig::File(FileSinkConfig {
                path: PathBuf::from("wagg-points.jsonl"),
            }),
            generator: GeneratorConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

/// `[module]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModuleConfig {
    /// The incumbent strategy at first start: a built-in (`hashmap`,
    /// `btree`, `sorted`, `leaky`), a module in the registry (`name@version`
    /// or id), or the path of a `.wasm` component. Once a rollout has been
    /// saved (`<data_dir>/rollout.json`), its incumbent wins.
    pub strategy: String,
    /// Options passed to the module's `configure`.
    pub options: BTreeMap<String, String>,
}

impl Default for ModuleConfig {
    fn default() -> Self {
        ModuleConfig {
            strategy: "hashmap".into(),
            options: BTreeMap::new(),
        }
    }
}

/// `[source]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `[source.amqp]`: RabbitMQ.
    pub amqp: AmqpConfig,
}

/// A configuration that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not TOML, or a field of the wrong type or name.
    #[error("{0}")]
    Parse(String),
    /// A field's value is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Parses and validates a `wagg.toml`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field (and, for parse errors, the line).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    ///
    /// A [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        self.router
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let p = &self.pipeline;
        if p.bucket_seconds == 0 {
            return invalid("pipeline.bucket_seconds: must be at least 1".into());
        }
        if p.batch_size == 0 || p.batch_size > crate::runtime::engine::MAX_BATCH {
            return invalid(format!(
                "pipeline.batch_size: {} is outside 1..={}",
                p.batch_size,
                crate::runtime::engine::MAX_BATCH
            ));
        }
        if self.runtime.memory_limit_bytes < (1 << 20) {
            return invalid("runtime.memory_limit_bytes: at least 1 MiB is needed".into());
        }
        self.source
            .amqp
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.sink
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("sink: {e}")))?;
        Ok(())
    }

    /// Module options as `configure` takes them.
    pub fn module_options(&self) -> Vec<(String, String)> {
        self.module
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A documented configuration with every default, printed by
/// `wagg config example`.
pub const EXAMPLE: &str = include_str!("../wagg.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_the_defaults() {
        let parsed = Config::from_toml(EXAMPLE).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn a_bad_field_is_named() {
        let err = Config::from_toml("[pipeline]\nbucket_secs = 10\n").unwrap_err();
        assert!(err.to_string().contains("bucket_secs"), "{err}");
        let err = Config::from_toml("[pipeline]\nbucket_seconds = 0\n").unwrap_err();
        assert!(err.to_string().contains("pipeline.bucket_seconds"), "{err}");
        let err = Config::from_toml("[router]\nshards = 0\n").unwrap_err();
        assert!(err.to_string().contains("router.shards"), "{err}");
    }

    #[test]
    fn config_check_refuses_an_https_sink_url_that_run_would_refuse() {
        let toml = "[sink]\nkind = \"opentsdb\"\nurl = \"https://tsdb.example:4242\"\n";
        let err = Config::from_toml(toml).unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
        let ok = "[sink]\nkind = \"opentsdb\"\nurl = \"http://tsdb.example:4242\"\n";
        Config::from_toml(ok).unwrap();
    }
}
