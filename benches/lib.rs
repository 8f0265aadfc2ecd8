//! wagg benchmarks live in `benches/`; see `cargo bench -p wagg-benches`.
//!
//! [`live_shard`] drives a real shard from outside, for the benches and
//! measurement binaries that need one (`swap`, `swap-pause`,
//! `series-memory`).

pub mod live_shard;
