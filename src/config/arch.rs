//! The `[sae] arch` table: which SAE variant and its hyperparameters.
//!
//! Decision: until `crate::sae::ArchConfig` (a `#[serde(tag = "kind")]` enum owned by
//! the SAE module) lands, the arch is kept as a TOML table with a required `kind`
//! string. This file is the ONE place to swap: replace [`ArchConfig`] by
//! `pub use crate::sae::ArchConfig;` and give that enum a `kind()` method returning the
//! tag (e.g. `"topk"`); nothing else in `config` looks inside the table.

use serde::{Deserialize, Serialize};

/// An SAE architecture: `{ kind = "topk", k = 32 }`. Every key besides `kind` belongs to
/// the variant (its meaning, unit and default are documented in `sae/<kind>.rs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ArchConfig(toml::Table);

impl ArchConfig {
    /// The variant name, e.g. `"topk"`, `"gated"`, `"relu_l1"`.
    pub fn kind(&self) -> &str {
        self.0.get("kind").and_then(|v| v.as_str()).unwrap_or("")
    }

    /// The whole table, `kind` included.
    pub fn table(&self) -> &toml::Table {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ArchConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let table = toml::Table::deserialize(d)?;
        match table.get("kind") {
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(ArchConfig(table)),
            Some(_) => Err(D::Error::custom(
                "`kind` must be a non-empty string, e.g. \"topk\"",
            )),
            None => Err(D::Error::missing_field("kind")),
        }
    }
}
