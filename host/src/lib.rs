//! wagg: a host for WebAssembly-sandboxed metrics aggregation.
//!
//! # Layout
//!
//! Data flows one way: `source → router → shard → runtime → sink`.
//!
//! - [`source`]: where messages come from (RabbitMQ, the demo generator)
//!   and the message format ([`source::json`]);
//! - [`router`]: rollups, consistent hashing by customer onto shards, series
//!   keys;
//! - [`runtime`]: aggregation strategies as Wasm components run with a memory
//!   limit and a CPU budget per instance; loading, validation, the compiled
//!   module cache.
//! - [`sink`]: where flushed aggregates go: an OpenTSDB-compatible HTTP API
//!   (batched, gzipped, retried) or a JSON-lines file.
//! - [`traffic`]: production traffic reproduced: `wagg loadgen`, `record`,
//!   `replay` and the offline module `bench`.
//! - [`telemetry`]: every Prometheus metric (`/metrics`) and the typed
//!   events that write each metric together with its log line.

pub mod admin;
pub mod config;
pub mod pipeline;
pub mod router;
pub mod runtime;
pub mod shard;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod traffic;
