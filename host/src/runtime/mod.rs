//! The module runtime: aggregation strategies as sandboxed Wasm components.
//!
//! - [`engine`]: every wasmtime setting and the limits each instance gets;
//! - [`Runtime::load`]: checks, compiles (or loads from the [`cache`]), type
//!   checks and trial-runs a module;
//! - [`Instance`]: one instance with its own memory limit and CPU budget,
//!   whose calls return typed errors and whose output is [`output`]-checked.

mod bindings;
pub mod cache;
pub mod engine;
mod error;
mod instance;
mod module;
pub mod output;

pub use bindings::{AGGREGATOR_EXPORT, Aggregates, ExtraColumn};
pub use engine::RuntimeLimits;
pub use error::{InstanceError, LoadError};
pub use instance::{Batch, Export, Instance, ModuleStats};
pub use module::{LoadedModule, ModuleInfo, Runtime};

/// The component bytes of a built-in strategy (`hashmap`, `btree`,
/// `sorted`, `leaky`), embedded in the binary at build time.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    wagg_artifacts::BUILTINS
        .iter()
        .find(|g| g.name == name)
        .map(|g| g.bytes)
}

/// Names of the built-in strategies.
pub fn builtin_names() -> Vec<&'static str> {
    wagg_artifacts::BUILTINS.iter().map(|g| g.name).collect()
}

/// A module's id: the SHA-256 of its bytes, hex.
pub fn content_id(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
