//! The `[sae] arch` table: which SAE variant and its hyperparameters.
//!
//! It is [`crate::sae::ArchConfig`], the `{ kind, … }` table owned by the SAE module: `kind`
//! picks a registered variant (one file under `sae/`, each with its documented `Config`). This
//! re-export is the one place `config` names it; `config` itself only calls `kind()`.

pub use crate::sae::ArchConfig;
