//! Benchmarks live in benches/; run `cargo bench -p chatproof-bench`.
