//! Steering a running host: the module registry, rollouts with automatic
//! rollback, and the admin HTTP API that exposes them.
//!
//! - [`registry`]: uploaded modules on disk;
//! - [`controller`]: which module each shard runs — rollout by whole
//!   shards, promote, roll back, and the circuit breaker that rolls a
//!   failing candidate back by itself.
//! - [`http`]: the admin HTTP API over the controller (module upload, list,
//!   remove; rollout, promote, rollback; health, readiness, `/metrics`),
//!   with bearer-token authentication of every change and a body limit;
//! - [`client`]: its client, behind `wagg module upload/list/remove`,
//!   `wagg rollout`, `wagg promote` and `wagg rollback`.

pub mod ab;
pub mod client;
pub mod controller;
pub mod http;
pub mod registry;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use controller::{Controller, ModuleState, ModuleView, RolloutView};
pub use registry::{ModuleRecord, Registry};

/// `[admin]` in wagg.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address the admin API listens on. Loopback by default: the API can
    /// replace the code that aggregates every customer's data.
    pub listen: SocketAddr,
    /// Bearer token every mutating call must carry. Also `WAGG_ADMIN_TOKEN`
    /// in the environment, which wins. Without a token, mutating calls are
    /// refused.
    pub token: Option<String>,
    /// Largest request body accepted (a module upload), bytes; larger
    /// bodies are refused with 413 before they are read.
    pub max_body_bytes: usize,
    /// A candidate that fails (trap, memory limit, CPU budget, bad output)
    /// this many times within `breaker_window_secs` is rolled back.
    pub breaker_failures: u32,
    /// The circuit breaker's window, seconds.
    pub breaker_window_secs: u64,
    /// Roll a candidate back once its shadowed flushes disagreed with the
    /// incumbent's on this many (series, bucket) rows in total. Unset: a
    /// disagreement is only reported.
    pub rollback_on_divergence: Option<u64>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            token: None,
            max_body_bytes: 16 << 20,
            breaker_failures: 3,
            breaker_window_secs: 60,
            rollback_on_divergence: None,
        }
    }
}

/// Why an admin request was refused. [`AdminError::status`] is its HTTP
/// status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The module (or its options) was refused: validation, compile, trial.
    #[error("module refused: {0}")]
    Invalid(String),
    /// The request itself is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No such module.
    #[error("no module `{0}`")]
    NotFound(String),
    /// The request conflicts with the current state (remove a module in
    /// use, upload a duplicate, promote without a candidate).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The pipeline is not running.
    #[error("the pipeline is not running")]
    NotRunning,
    /// A module failed while taking over shards; the rollout was undone.
    #[error("swap failed: {0}")]
    SwapFailed(String),
    /// Disk trouble in the data directory.
    #[error("storage: {0}")]
    Storage(String),
}

impl AdminError {
    /// The HTTP status that reports this error.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::Invalid(_) => 422,
            AdminError::BadRequest(_) => 400,
            AdminError::NotFound(_) => 404,
            AdminError::Conflict(_) => 409,
            AdminError::SwapFailed(_) => 409,
            AdminError::NotRunning => 503,
            AdminError::Storage(_) => 500,
        }
    }
}
