//! Whether a unit's folder holds the SAE of that unit (issue 17 item 5): a `cfg.json` and
//! weights copied from another variant, width, hookpoint or sparsity into a unit's folder
//! must never be evaluated (or kept by train) under this unit's name.
//!
//! What is compared, for a folder whose `train_done.json` claims it:
//! - `train_done.json`: its point id and hookpoint against the unit's (a marker copied
//!   from another unit names that unit);
//! - `cfg.json`: `metadata.saepipe_arch` (the variant), `metadata.hook_name`, `d_in`
//!   (against the marker's), `d_sae` (against the unit's `sae.d_sae` at that `d_in`) and
//!   the sparsity knob the format records (`k` for the TopK family, `rank` for k-means);
//! - the sha256 of `cfg.json` and `sae_weights.safetensors` against the ones training
//!   recorded in the marker, which catches what the files cannot say about themselves
//!   (an L1 coefficient, a seed).
//!
//! Decision: a folder whose marker names this unit but another point hash is stale (the
//! config changed), not foreign: it is simply not trained, as before.
//! Decision: markers written before the sha256 fields existed are checked on everything
//! else; their files are trusted as they were.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::unit::{read_done, TrainDone, Unit};
use crate::sae::export::{CFG_FILE, WEIGHTS_FILE};

/// The sha256 (hex) of a file's bytes, read in blocks.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Why a unit's folder does not hold that unit's SAE.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// What the folder holds.
    pub holds: String,
    /// What the unit is.
    pub unit: String,
    /// Each difference.
    pub diffs: Vec<String>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it holds {}, but the unit is {} ({})",
            self.holds,
            self.unit,
            self.diffs.join("; ")
        )
    }
}

/// What the unit is, in words: `gated SAE, d_sae 128, l1_coefficient 1 (point … at …)`.
fn describe_unit(u: &Unit, d_in: Option<usize>) -> String {
    let arch = &u.point.config.sae.arch;
    let (name, value) = arch.sparsity_param();
    let width = match (d_in, u.point.config.sae.d_sae) {
        (_, Some(f)) => format!("d_sae {f}"),
        (Some(d), None) => format!("d_sae {}", u.point.config.sae.d_sae(d)),
        (None, None) => format!(
            "expansion_factor {}",
            u.point.config.sae.expansion_factor.unwrap_or(1)
        ),
    };
    format!(
        "a {} SAE, {width}, {name} {value} (point {} at {})",
        arch.kind(),
        u.point.id,
        u.hookpoint
    )
}

/// Check the folder of `u`; `Ok(None)` when it holds this unit's SAE or does not claim to
/// (no marker, or a stale marker of this unit), `Ok(Some)` when it holds another's.
pub fn check_unit_folder(u: &Unit) -> Result<Option<Mismatch>> {
    let Some(done) = read_done(&u.dir) else {
        return Ok(None);
    };
    let hookpoint = u.hookpoint.to_string();
    let mut diffs = Vec::new();
    if done.point_id != u.point.id {
        diffs.push(format!(
            "train_done.json names point {}, not {}",
            done.point_id, u.point.id
        ));
    }
    if done.hookpoint != hookpoint {
        diffs.push(format!(
            "train_done.json names hookpoint {}, not {hookpoint}",
            done.hookpoint
        ));
    }
    if diffs.is_empty() && done.point_hash != u.point.hash {
        return Ok(None); // stale: this unit, trained with another config
    }
    let cfg_path = u.dir.join(CFG_FILE);
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut holds = format!(
        "the SAE of train_done.json's {} at {}",
        done.point_id, done.hookpoint
    );
    if let Some(cfg) = &cfg {
        holds = describe_cfg(cfg, &done);
        compare_cfg(cfg, &done, u, &mut diffs);
    }
    compare_files(&done, &u.dir, &mut diffs)?;
    if diffs.is_empty() {
        return Ok(None);
    }
    Ok(Some(Mismatch {
        holds,
        unit: describe_unit(u, Some(done.d_in)),
        diffs,
    }))
}

/// What `cfg.json` (and the marker) say the folder holds.
fn describe_cfg(cfg: &serde_json::Value, done: &TrainDone) -> String {
    let arch = cfg["metadata"]["saepipe_arch"]
        .as_str()
        .filter(|s| !s.is_empty())
        .or_else(|| cfg["architecture"].as_str())
        .unwrap_or("?");
    let mut s = format!("a {arch} SAE, d_in {}, d_sae {}", cfg["d_in"], cfg["d_sae"]);
    for key in ["k", "rank"] {
        if let Some(v) = cfg[key].as_u64() {
            s.push_str(&format!(", {key} {v}"));
        }
    }
    s.push_str(&format!(
        " at {} (marked as point {} at {})",
        cfg["metadata"]["hook_name"].as_str().unwrap_or("?"),
        done.point_id,
        done.hookpoint
    ));
    s
}

fn compare_cfg(cfg: &serde_json::Value, done: &TrainDone, u: &Unit, diffs: &mut Vec<String>) {
    let arch = &u.point.config.sae.arch;
    if let Some(a) = cfg["metadata"]["saepipe_arch"]
        .as_str()
        .filter(|a| !a.is_empty())
    {
        if a != arch.kind() {
            diffs.push(format!("cfg.json is a {a} SAE, not {}", arch.kind()));
        }
    }
    let hookpoint = u.hookpoint.to_string();
    if let Some(h) = cfg["metadata"]["hook_name"].as_str() {
        if h != hookpoint {
            diffs.push(format!("cfg.json is for hookpoint {h}, not {hookpoint}"));
        }
    }
    let d_in = cfg["d_in"].as_u64().map(|v| v as usize);
    if let Some(d) = d_in.filter(|&d| d != done.d_in) {
        diffs.push(format!(
            "cfg.json has d_in {d}, train_done.json {}",
            done.d_in
        ));
    }
    if let Some(f) = cfg["d_sae"].as_u64().map(|v| v as usize) {
        let want = u.point.config.sae.d_sae(d_in.unwrap_or(done.d_in));
        if f != want {
            diffs.push(format!("cfg.json has d_sae {f}, the unit {want}"));
        }
    }
    let (name, value) = arch.sparsity_param();
    if let Some(v) = cfg[name].as_u64().filter(|&v| v as f64 != value) {
        diffs.push(format!("cfg.json has {name} {v}, the unit {value}"));
    }
}

fn compare_files(done: &TrainDone, dir: &Path, diffs: &mut Vec<String>) -> Result<()> {
    for (file, want) in [
        (CFG_FILE, &done.cfg_sha256),
        (WEIGHTS_FILE, &done.weights_sha256),
    ] {
        let Some(want) = want else { continue };
        let path = dir.join(file);
        if !path.is_file() {
            diffs.push(format!("{file} is missing"));
            continue;
        }
        if &file_sha256(&path)? != want {
            diffs.push(format!(
                "{file} is not the file training wrote for this unit (its sha256 differs from train_done.json's)"
            ));
        }
    }
    Ok(())
}
