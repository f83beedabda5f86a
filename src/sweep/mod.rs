//! Sweeps: grid points, Pareto frontiers, result tables and the plot (pipeline.md §4, §6;
//! sae_variants.md §7.6).

pub mod eval_stage;
pub mod pareto;
pub mod plot;
pub mod results;
pub mod train_stage;
