//! # saepipe
//!
//! From a language model on the Hugging Face hub to a Pareto sweep of sparse
//! autoencoders, in four stages that run in order, each also runnable alone and each
//! resumable:
//!
//! 1. **download** — model weights, config, tokenizer and dataset files through `hf-hub`
//!    (cache, pinned revisions, offline mode), or `local:`/`gguf:` sources.
//! 2. **capture** — hookpoint activations from our own hookable candle forward passes
//!    ([`models`]), streamed to Parquet.
//! 3. **train** — SAE variants on those activations.
//! 4. **evaluate / sweep** — R², L0, dead fraction and CE-loss delta over grids, Pareto
//!    frontiers, Parquet tables and a plot.
//!
//! The contract users see is `../shared/specs/pipeline.md`.

pub mod bench;
pub mod capture;
pub mod config;
pub mod data;
pub mod error;
pub mod fsutil;
pub mod hub;
pub mod inspect;
pub mod jsae;
pub mod metrics;
pub mod models;
pub mod report;
pub mod rng;
pub mod sae;
pub mod sweep;
pub mod synthetic;
pub mod trace;
pub mod train;
