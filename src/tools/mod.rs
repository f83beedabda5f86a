//! Commands beside the pipeline: `saepipe inspect` (read an activation set),
//! `saepipe trace` (one forward pass, every hookpoint) and `saepipe bench` (throughput and
//! memory).

pub mod bench;
pub mod inspect;
pub mod inspect_sae;
pub mod trace;
