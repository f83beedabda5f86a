//! `saepipe inspect <SAE folder>`: what an SAELens folder holds, read without loading the
//! weights (the SAE arm of `saepipe inspect`).
//!
//! Shows `cfg.json` (architecture, `d_in`, `d_sae`, hookpoint, every other key: the
//! hyperparameters such as `k`), each tensor of `sae_weights.safetensors` with its shape and
//! dtype (from the safetensors header only, so a large SAE costs nothing to inspect), the
//! training state (`train_done.json`, `checkpoint.safetensors`) and the metrics row of
//! `metrics.json` when the unit has been evaluated.
//!
//! Decision: `cfg.json` and `metrics.json` are read as plain JSON and printed key by key, so
//! inspect shows every key a file has, including ones written by newer versions or other
//! tools (SAELens itself), instead of only the fields this version knows.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;

use crate::pipeline::evaluate::METRICS_FILE;
use crate::pipeline::train::TRAIN_DONE;
use crate::sae::export::{CFG_FILE, WEIGHTS_FILE};
use crate::train::CHECKPOINT_FILE;

/// A file of an SAE folder that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct SaeInspectError {
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong.
    pub msg: String,
}

/// Whether `dir` looks like an SAE folder (a `cfg.json` or `sae_weights.safetensors`).
pub fn is_sae_dir(dir: &Path) -> bool {
    dir.join(CFG_FILE).is_file() || dir.join(WEIGHTS_FILE).is_file()
}

fn err(path: &Path, msg: impl Into<String>) -> SaeInspectError {
    SaeInspectError {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, SaeInspectError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

/// A JSON value on one line: strings unquoted, floats in at most 6 significant digits.
fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let s = format!("{x:.6}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            if s.is_empty() || s == "-" {
                "0".into()
            } else {
                s.to_string()
            }
        }
        other => other.to_string(),
    }
}

/// The report for the SAE folder `dir`.
pub fn inspect_sae(dir: &Path) -> Result<String, SaeInspectError> {
    let mut out = format!("{}: SAE folder (SAELens format)\n", dir.display());
    let cfg_path = dir.join(CFG_FILE);
    if cfg_path.is_file() {
        out.push_str(&render_cfg(&cfg_path, &read_json(&cfg_path)?));
    } else {
        let _ = writeln!(
            out,
            "{CFG_FILE}: missing (the folder is not a complete SAE; re-run `saepipe train`)"
        );
    }
    let w = dir.join(WEIGHTS_FILE);
    if w.is_file() {
        out.push_str(&render_tensors(&w)?);
    } else {
        let _ = writeln!(out, "{WEIGHTS_FILE}: missing");
    }
    let state = if dir.join(TRAIN_DONE).is_file() {
        format!("finished ({TRAIN_DONE})")
    } else if dir.join(CHECKPOINT_FILE).is_file() {
        format!("in progress ({CHECKPOINT_FILE}; `saepipe train` resumes it)")
    } else {
        format!("no {TRAIN_DONE}")
    };
    let _ = writeln!(out, "training: {state}");
    let m = dir.join(METRICS_FILE);
    if m.is_file() {
        out.push_str(&render_metrics(&m)?);
    } else {
        let _ = writeln!(out, "metrics: not evaluated yet (no {METRICS_FILE})");
    }
    Ok(out)
}

fn render_cfg(path: &Path, cfg: &serde_json::Value) -> String {
    let mut out = String::new();
    let Some(obj) = cfg.as_object() else {
        let _ = writeln!(out, "{}: not a JSON object", path.display());
        return out;
    };
    let get = |k: &str| obj.get(k).map(show).unwrap_or_else(|| "?".into());
    let md = obj.get("metadata").and_then(|m| m.as_object());
    let mdget = |k: &str| md.and_then(|m| m.get(k)).map(show);
    let variant = mdget("saepipe_arch")
        .map(|v| format!(" (saepipe variant {v})"))
        .unwrap_or_default();
    let _ = writeln!(out, "architecture: {}{variant}", get("architecture"));
    let _ = writeln!(out, "d_in: {}  d_sae: {}", get("d_in"), get("d_sae"));
    let _ = writeln!(
        out,
        "hookpoint: {}",
        mdget("hook_name").unwrap_or_else(|| "?".into())
    );
    for (label, key) in [
        ("model", "model_name"),
        ("dataset", "dataset_path"),
        ("context_size", "context_size"),
    ] {
        if let Some(v) = mdget(key).filter(|v| !v.is_empty()) {
            let _ = writeln!(out, "{label}: {v}");
        }
    }
    let _ = writeln!(out, "{CFG_FILE}:");
    let skip = ["architecture", "d_in", "d_sae", "metadata"];
    for (k, v) in obj.iter().filter(|(k, _)| !skip.contains(&k.as_str())) {
        let _ = writeln!(out, "  {k} = {}", show(v));
    }
    out
}

/// The tensors of a safetensors file, from its header: `[u64 LE n][n bytes of JSON]`.
fn render_tensors(path: &Path) -> Result<String, SaeInspectError> {
    let mut f = std::fs::File::open(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let size = f
        .metadata()
        .map_err(|e| err(path, format!("cannot read: {e}")))?
        .len();
    let truncated = |what: &str| {
        err(
            path,
            format!("{what}; the file is truncated or not a safetensors file — re-run `saepipe train --force` for this unit"),
        )
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| truncated("shorter than a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(truncated(&format!("header length {n} exceeds the file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| truncated("the header ends early"))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| truncated(&format!("the header is not JSON ({e})")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| truncated("the header is not a JSON object"))?;
    let mut out = format!("{WEIGHTS_FILE} ({}):\n", crate::store::human_bytes(size));
    let mut end = 0u64;
    let mut rows: Vec<(u64, String)> = Vec::new();
    for (name, t) in obj.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let dtype = t.get("dtype").map(show).unwrap_or_else(|| "?".into());
        let shape = t
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().map(show).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "?".into());
        let offs = t.get("data_offsets").and_then(|o| o.as_array());
        let start = offs.and_then(|o| o.first()).and_then(|v| v.as_u64());
        if let Some(e) = offs.and_then(|o| o.get(1)).and_then(|v| v.as_u64()) {
            end = end.max(e);
        }
        rows.push((start.unwrap_or(0), format!("  {name}: [{shape}] {dtype}")));
    }
    if 8 + n + end > size {
        return Err(truncated(&format!(
            "the tensors need {} bytes, the file has {size}",
            8 + n + end
        )));
    }
    // In file order, as the writer laid them out.
    rows.sort();
    for (_, r) in rows {
        out.push_str(&r);
        out.push('\n');
    }
    Ok(out)
}

/// The metrics row of a unit's `metrics.json` (`{ point_hash, row: {...} }`), every
/// non-null column.
pub fn render_metrics(path: &Path) -> Result<String, SaeInspectError> {
    let v = read_json(path)?;
    let row = v.get("row").unwrap_or(&v);
    let Some(obj) = row.as_object() else {
        return Err(err(path, "no metrics row (expected a JSON object)"));
    };
    let mut out = format!("metrics ({METRICS_FILE}):\n");
    for (k, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
        let _ = writeln!(out, "  {k} = {}", show(v));
    }
    Ok(out)
}

/// Whether `path` is a unit's `metrics.json`.
pub fn is_metrics_file(path: &Path) -> bool {
    path.is_file() && path.file_name().is_some_and(|n| n == METRICS_FILE)
}
