//! What a train unit is (one SAE: a grid point at one hookpoint), where its folder is, and
//! the marker that says it is trained. Train, evaluate and the folder check
//! ([`super::unit_check`]) all read these; the train stage re-exports them.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::config::{Pipeline, Point};
use crate::models::Hookpoint;

/// The completion marker of a trained unit.
pub const TRAIN_DONE: &str = "train_done.json";

/// A unit's evaluation record (written by the evaluate stage, `pipeline::evaluate`); train
/// removes a stale one when it retrains a unit.
pub const METRICS_FILE: &str = "metrics.json";

/// A unit's lock file inside its folder (train and evaluate of one unit take it).
pub const UNIT_LOCK: &str = ".unit.lock";

/// One SAE to train: a grid point at one hookpoint.
#[derive(Debug, Clone)]
pub struct Unit<'a> {
    /// The grid point.
    pub point: &'a Point,
    /// The hookpoint.
    pub hookpoint: Hookpoint,
    /// Its output folder.
    pub dir: PathBuf,
}

/// What `train_done.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainDone {
    /// Grid point id.
    pub point_id: String,
    /// Hookpoint name.
    pub hookpoint: String,
    /// Hash of the point's resolved config.
    pub point_hash: String,
    /// Activation width.
    pub d_in: usize,
    /// Latents.
    pub d_sae: usize,
    /// Tokens trained on.
    pub train_tokens: u64,
    /// Seconds spent in this SAE's training steps plus its share of data reading.
    pub train_seconds: f64,
    /// sha256 of the `cfg.json` training wrote (absent in markers of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg_sha256: Option<String>,
    /// sha256 of the `sae_weights.safetensors` training wrote (absent in older markers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
}

/// The units of `pipeline`, all or the one grid point `only`.
pub fn units<'a>(pipeline: &'a Pipeline, only: Option<&str>) -> Result<Vec<Unit<'a>>> {
    let points: Vec<&Point> = match only {
        Some(id) => vec![pipeline.point(id)?],
        None => pipeline.points().iter().collect(),
    };
    let saes = pipeline.run_dir().join("saes");
    let mut out = Vec::new();
    for p in points {
        for &hp in &p.config.capture.hookpoints {
            out.push(Unit {
                point: p,
                hookpoint: hp,
                dir: saes.join(&p.id).join(hp.to_string()),
            });
        }
    }
    Ok(out)
}

/// Read `dir/train_done.json` if it is there and parses.
pub fn read_done(dir: &Path) -> Option<TrainDone> {
    let text = std::fs::read_to_string(dir.join(TRAIN_DONE)).ok()?;
    serde_json::from_str(&text).ok()
}
