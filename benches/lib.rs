//! wagg benchmarks live in `benches/`; see `cargo bench -p wagg-benches`.
