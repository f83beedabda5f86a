//! The `[sae] arch` table: which SAE variant and its hyperparameters.
//!
//! It is [`crate::sae::ArchConfig`], a `#[serde(tag = "kind")]` enum owned by the SAE
//! module (one variant per file under `sae/`, each with its documented `Config`). This
//! re-export is the one place `config` names it; `config` itself only calls `kind()`.

pub use crate::sae::ArchConfig;
