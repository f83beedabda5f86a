//! The pipeline: the stages of a run, in order, each a function of a loaded
//! [`crate::config::Pipeline`] that reads and writes its run folder.
//!
//! 1. [`download`]: model and dataset files through the hub (or local/GGUF sources);
//! 2. [`capture`]: hookpoint activations to Parquet;
//! 3. [`train`]: every SAE unit (grid point × hookpoint), resumable inside a unit;
//! 4. [`jsae`]: Jacobian SAE pairs, when the pipeline has a `[jsae]` section;
//! 5. [`evaluate`]: metrics per unit, then [`results`] (Parquet tables) and [`plot`].
//!
//! With `capture.keep = false`, [`stream`] replaces stages 2 and 3: capture a chunk,
//! train on it, delete it, within a disk budget.
//!
//! [`units`] addresses one unit of a stage by index, for cluster array tasks.

pub mod calibrate;
pub mod capture;
pub mod ce;
pub mod disk;
pub mod download;
pub mod evaluate;
pub mod export_meta;
pub mod jsae;
pub mod plan;
pub mod plot;
pub mod results;
pub mod stream;
pub mod train;
pub mod unit;
pub mod unit_check;
pub mod units;
