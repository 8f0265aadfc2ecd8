//! wagg: a host for WebAssembly-sandboxed metrics aggregation.
//!
//! # Layout
//!
//! Data flows one way: `source → router → shard → runtime → sink`, and
//! [`pipeline`] wires the stages together; [`admin`] and [`telemetry`]
//! observe and steer through narrow handles.
//!
//! - [`source`]: where messages come from (RabbitMQ with manual acks and
//!   dead-lettering, the demo's generator) and the message format
//!   ([`source::json`]);
//! - [`router`]: rollups, jump consistent hashing by customer onto shards,
//!   series keys;
//! - [`shard`]: a thread per shard owning a module instance and the series
//!   dictionary; flushes to the outbox, snapshots for checkpoints, rebuilds a
//!   failed module, hot swaps;
//! - [`runtime`]: aggregation strategies as Wasm components run with a
//!   memory limit and a CPU budget per instance; loading, validation, the
//!   compiled-module cache;
//! - [`sink`]: where flushed aggregates go: an OpenTSDB-compatible HTTP API
//!   (batched, gzipped, retried) or a JSON-lines file;
//! - [`pipeline`]: the coordinator — batching, watermarks and flushes,
//!   checkpoints and the acknowledgements tied to them, backpressure,
//!   recognising redeliveries;
//! - [`admin`]: the module registry, rollouts with automatic rollback, the
//!   admin HTTP API and its CLI client;
//! - [`telemetry`]: every Prometheus metric (`/metrics`) and the typed
//!   events that write each metric together with its log line;
//! - [`traffic`]: production traffic reproduced: `wagg loadgen`, `record`,
//!   `replay` and the offline module `bench`;
//! - [`config`]: `wagg.toml`, one section per stage.

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
