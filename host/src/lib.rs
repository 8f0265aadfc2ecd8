//! wagg: a host for WebAssembly-sandboxed metrics aggregation.
//!
//! # Layout
//!
//! Data flows one way: `source → router → shard → runtime → sink`.
//!
//! - [`runtime`]: aggregation strategies as Wasm components run with a memory
//!   limit and a CPU budget per instance; loading, validation, the compiled
//!   module cache.

pub mod runtime;
