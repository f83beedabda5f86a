//! Commands beside the pipeline: `saepipe inspect` (read an activation set),
//! `saepipe trace` (one forward pass, every hookpoint) and `saepipe bench` (throughput and
//! memory), and [`cluster`] (`saepipe slurm` / `saepipe k8s`: job arrays over the units).

pub mod bench;
pub mod cluster;
pub mod inspect;
pub mod inspect_sae;
pub mod trace;
