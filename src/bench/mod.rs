//! Benchmarks behind `saepipe bench <what>`: throughput and peak memory, printed, never
//! asserted (STYLE.md §2.9 item 7).

pub mod train;
