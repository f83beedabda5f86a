//! The `[sae] arch` table: which SAE variant and its hyperparameters.
//!
//! The type is the SAE module's own tagged enum ([`crate::sae::ArchConfig`],
//! `{ kind = "topk", k = 32 }`), so a pipeline file is checked against exactly the
//! variants and fields the trainer knows; each variant's keys, units and defaults are
//! documented in `src/sae/<kind>.rs`.

pub use crate::sae::ArchConfig;
