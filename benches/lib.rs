//! wagg benchmarks live in `benches/`; see `cargo bench -p wagg-benches`.
//!
//! [`live_shard`] drives a real shard from outside, for the benches and
//! measurement binaries that need one (`swap`, `swap-pause`,
//! `series-memory`). [`workload`] is the strategies' `put` and `flush`
//! workload, in Wasm and natively (`strategies`, `instructions`).

pub mod live_shard;
pub mod workload;
