//! Sweep expansion: the Cartesian product of the `[sweep]` axes, each point a fully
//! resolved and validated config with a stable id.
//!
//! An id reads `<arch kind>-<axis labels>-<hash6>`, e.g. `topk-x8-k32-s0-3fa2c1`. The
//! hash is the sha256 of the point's overrides (`key=value` lines sorted by key), so it
//! does not depend on the order of the axes, and re-running a sweep finds its points
//! again. Labels: `expansion_factor` → `x8`, `d_sae` → `d4096`, `run.seed` → `s0`, any
//! other key → `<last segment><value>`; a table value contributes one label per entry
//! (`kind` is already the prefix). Width labels come first, seeds last.
//!
//! Decision: a table value merges into the table at its key, except a table with `kind`
//! (a tagged union such as `sae.arch`), which replaces it ([`super::overrides::assign`]).
//! An axis `sae = [{ expansion_factor = 2, arch = { kind = "gated" } }, ...]` therefore
//! couples width and variant (Gated at 2H against SA-GSAE at H) where a plain product
//! cannot. Axes are applied wider key first, so `sae.arch.k` refines `sae`.
//! The root axis `"." = [{ sae = {...}, train = {...} }, ...]` couples keys of different
//! sections the same way (each value is merged into the whole file), e.g. PAM-SGD runs
//! (`train.optimizer`) only for the variants that support them, next to k-means baselines.

use toml::{Table, Value};

use super::overrides::{assign, parse_key};
use super::parse::Problems;
use super::schema::PipelineConfig;
use super::{canonical, sha256_hex, validate};

/// One grid point.
#[derive(Debug, Clone)]
pub struct Point {
    /// Stable id, e.g. `topk-x8-k32-s0-3fa2c1`; the name of the point's output folder.
    pub id: String,
    /// The point's assignments (dotted key, value), sorted by key. Empty without a sweep.
    pub overrides: Vec<(String, Value)>,
    /// The fully resolved config of this point (`sweep` emptied).
    pub config: PipelineConfig,
    /// Canonical TOML of `config`.
    pub resolved: String,
    /// sha256 of `resolved` (with `run.offline` left out, as for the pipeline).
    pub hash: String,
}

/// Expand and validate every point; problems go to `probs`, tagged with the point.
pub fn expand(config: &PipelineConfig, probs: &mut Problems) -> Vec<Point> {
    let mut base_cfg = config.clone();
    base_cfg.sweep = Table::new();
    let base = match Table::try_from(&base_cfg) {
        Ok(t) => t,
        Err(e) => {
            probs.add("sweep", format!("cannot expand: {e}"));
            return Vec::new();
        }
    };
    let mut axes: Vec<(String, Vec<String>, Vec<Value>)> = Vec::new();
    for (key, v) in &config.sweep {
        let path = if key == ROOT_AXIS {
            Ok(Vec::new())
        } else {
            parse_key(key)
        };
        let (Ok(path), Some(values)) = (path, v.as_array()) else {
            continue; // reported by validate::check_sweep
        };
        axes.push((key.clone(), path, values.clone()));
    }
    // Wider keys first, so that a more specific axis (`sae.arch.k`) refines a wider one
    // (`sae`) instead of being overwritten by it.
    axes.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| a.0.cmp(&b.0)));
    let n: usize = axes.iter().map(|a| a.2.len()).product();
    let mut points: Vec<Point> = Vec::with_capacity(n);
    let mut idx = vec![0usize; axes.len()];
    for _ in 0..n {
        let mut raw = base.clone();
        let mut overrides = Vec::with_capacity(axes.len());
        let mut set_failed = false;
        for ((key, path, values), &i) in axes.iter().zip(&idx) {
            let result = match (path.is_empty(), &values[i]) {
                (true, Value::Table(t)) => t
                    .iter()
                    .try_for_each(|(k, v)| assign(&mut raw, std::slice::from_ref(k), v.clone())),
                (true, other) => Err(format!(
                    "values of the root axis must be tables of sections, not a {}",
                    other.type_str()
                )),
                (false, v) => assign(&mut raw, path, v.clone()),
            };
            if let Err(e) = result {
                probs.add(format!("sweep.\"{key}\""), e);
                set_failed = true;
            }
            overrides.push((key.clone(), values[i].clone()));
        }
        overrides.sort_by(|a, b| a.0.cmp(&b.0));
        if !set_failed {
            let mut point_probs = Problems::default();
            let cfg = validate::check(raw, &mut point_probs);
            let desc = overrides
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ");
            for p in point_probs.0 {
                probs.add(p.key, format!("{} (in sweep point {desc})", p.message));
            }
            if let Some(cfg) = cfg {
                let id = point_id(cfg.sae.arch.kind(), &overrides);
                if let Some(dup) = points.iter().find(|p| p.id == id) {
                    probs.add(
                        "sweep",
                        format!("point {id} appears twice (a value is listed twice on an axis: {desc} vs {:?})", dup.overrides),
                    );
                }
                let (resolved, hash) = canonical(&cfg);
                points.push(Point {
                    id,
                    overrides,
                    config: cfg,
                    resolved,
                    hash,
                });
            }
        }
        // Next index, last axis fastest.
        for a in (0..axes.len()).rev() {
            idx[a] += 1;
            if idx[a] < axes[a].2.len() {
                break;
            }
            idx[a] = 0;
        }
    }
    points
}

/// Key of the root axis, whose values are merged into the whole file.
pub const ROOT_AXIS: &str = ".";

/// The id of a point with arch `kind` and (sorted) `overrides`.
pub fn point_id(kind: &str, overrides: &[(String, Value)]) -> String {
    let canon = overrides
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect::<String>();
    let hash = sha256_hex(canon.as_bytes());
    let mut labels: Vec<(u8, String)> = Vec::new();
    for (k, v) in overrides {
        let path = if k == ROOT_AXIS {
            Vec::new()
        } else {
            parse_key(k).unwrap_or_else(|_| vec![k.clone()])
        };
        push_labels(&path, v, &mut labels);
    }
    labels.sort_by_key(|l| l.0);
    let mut id = sanitize(if kind.is_empty() { "sae" } else { kind });
    for (_, l) in labels {
        if id.len() + l.len() > 60 {
            break;
        }
        id.push('-');
        id.push_str(&l);
    }
    format!("{id}-{}", &hash[..6])
}

fn push_labels(path: &[String], v: &Value, out: &mut Vec<(u8, String)>) {
    if let Value::Table(t) = v {
        for (k, sub) in t {
            let mut p = path.to_vec();
            p.push(k.clone());
            push_labels(&p, sub, out);
        }
        return;
    }
    let last = path.last().map(String::as_str).unwrap_or("");
    let value = match v {
        Value::String(s) => sanitize(s),
        Value::Integer(i) => sanitize(&i.to_string()),
        Value::Float(f) => sanitize(&f.to_string()),
        Value::Boolean(b) => b.to_string(),
        _ => "v".to_string(),
    };
    let (order, label) = match (path.first().map(String::as_str), last) {
        // the optimiser is not the arch prefix: name it when it is not the default
        (Some("train"), "kind") if value != "adam" => (5, value),
        (_, "kind") => return,
        (_, "expansion_factor") => (0, format!("x{value}")),
        (_, "d_sae") => (0, format!("d{value}")),
        (Some("run"), "seed") => (9, format!("s{value}")),
        _ => (5, format!("{}{value}", sanitize(last))),
    };
    out.push((order, label));
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_read_like_the_grid() {
        let o = vec![
            ("run.seed".to_string(), Value::Integer(0)),
            ("sae.arch.k".to_string(), Value::Integer(32)),
            ("sae.expansion_factor".to_string(), Value::Integer(8)),
        ];
        let id = point_id("topk", &o);
        assert!(id.starts_with("topk-x8-k32-s0-"), "{id}");
        assert_eq!(id.len(), "topk-x8-k32-s0-".len() + 6);
    }

    proptest! {
        #[test]
        fn ids_are_stable_and_distinct(
            a in proptest::collection::btree_map("[a-z]{1,6}\\.[a-z_]{1,8}", -1000i64..1000, 0..4),
            b in proptest::collection::btree_map("[a-z]{1,6}\\.[a-z_]{1,8}", -1000i64..1000, 0..4),
        ) {
            let to_vec = |m: &std::collections::BTreeMap<String, i64>| -> Vec<(String, Value)> {
                m.iter().map(|(k, v)| (k.clone(), Value::Integer(*v))).collect()
            };
            let (va, vb) = (to_vec(&a), to_vec(&b));
            prop_assert_eq!(point_id("topk", &va), point_id("topk", &va.clone()));
            if a != b {
                prop_assert_ne!(point_id("topk", &va), point_id("topk", &vb));
            }
        }
    }
}
