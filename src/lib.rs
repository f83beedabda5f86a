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

//! Layout, from the bottom up (a module imports only from lines above its own; the test
//! `tests/it/layers.rs` keeps it so):
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 0 | [`util`] | errors, atomic files, RNG, progress |
//! | 1 | [`kernels`] | dense and sparse f32 kernels, Cholesky |
//! | 2 | [`models`], [`data`] | hookable LMs; text → token windows |
//! | 3 | [`hub`], [`store`], [`sae`] | the hub; Parquet activations and `ActivationSource`; SAE variants |
//! | 4 | [`eval`], [`train`] | metrics and Pareto; the training engine |
//! | 5 | [`capture`], [`jsae`], [`synthetic`] | capture; Jacobian SAE pairs; synthetic dictionaries |
//! | 6 | [`config`] | the pipeline file |
//! | 7 | [`pipeline`] | the stages of a run, one file each |
//! | 8 | [`tools`] (and the binary's `cli.rs`) | inspect, trace, bench |

pub mod capture;
pub mod config;
pub mod data;
pub mod eval;
pub mod hub;
pub mod jsae;
pub mod kernels;
pub mod models;
pub mod pipeline;
pub mod sae;
pub mod store;
pub mod synthetic;
pub mod tools;
pub mod train;
pub mod util;
