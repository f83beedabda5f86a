//! `saepipe plan`: what a pipeline will cost before anything runs (issue 14 item 4).
//!
//! Decision: the model's shape comes from, in order, a `local:` folder's `config.json`,
//! a GGUF's metadata, the hub cache's `config.json` of the pinned revision, or a built-in
//! table of the pinned repos of `pipelines/` (copied from their hub `config.json`); the
//! plan prints which. Parameters are counted by the model constructors themselves
//! ([`crate::models::shape`]).
//! The disk arithmetic and the capture's disk check are [`super::disk`]'s; the streamed
//! chunk plan at the configured budget is [`super::stream::stream_plan`]'s, fed with the
//! planned shard rows (the run feeds it the rows of the tokenized data); the time per stage
//! is [`super::calibrate`]'s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::disk::{capture_bytes, planned_shard_rows, set_plan, shard_windows, streamed_min_bytes};
use super::stream::{distinct_hookpoints, stream_plan, StreamPlan};
use crate::config::{Pipeline, PipelineConfig};
use crate::hub::cache::{CachedRepo, RepoKind};
use crate::models::shape::{shape_of_config, shape_of_gguf, ModelShape};
use crate::models::ModelSource;
use crate::store::human_bytes;

/// `config.json` of the pinned hub models of `pipelines/`, for plans on machines whose
/// hub cache does not hold them (copied from the hub at those revisions).
const KNOWN_CONFIGS: &[(&str, &str)] = &[
    (
        "EleutherAI/pythia-1b",
        r#"{"model_type":"gpt_neox","vocab_size":50304,"hidden_size":2048,"num_hidden_layers":16,
            "num_attention_heads":8,"intermediate_size":8192,"hidden_act":"gelu","rotary_pct":0.25,
            "rotary_emb_base":10000,"layer_norm_eps":1e-5,"use_parallel_residual":true,
            "tie_word_embeddings":false,"max_position_embeddings":2048,"bos_token_id":0,
            "eos_token_id":0,"initializer_range":0.02}"#,
    ),
    (
        "HuggingFaceTB/SmolLM3-3B",
        r#"{"model_type":"smollm3","vocab_size":128256,"hidden_size":2048,"intermediate_size":11008,
            "num_hidden_layers":36,"num_attention_heads":16,"num_key_value_heads":4,
            "hidden_act":"silu","rms_norm_eps":1e-6,"rope_theta":5000000.0,
            "tie_word_embeddings":true,"max_position_embeddings":65536,"bos_token_id":128000,
            "eos_token_id":128012,"pad_token_id":128004}"#,
    ),
];

/// The model's shape and where it came from.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The shape.
    pub shape: ModelShape,
    /// Where it was read (printed by the plan).
    pub from: String,
}

/// The shape of the pipeline's model, offline (module doc: the order of the sources).
pub fn model_shape(pipeline: &Pipeline, cache_dir: &Path) -> Result<Shape> {
    let c = &pipeline.config;
    let read = |path: &Path| -> Result<ModelShape> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(shape_of_config(path, &text)?)
    };
    match pipeline.model_source() {
        ModelSource::Local { dir } => {
            let p = dir.join("config.json");
            Ok(Shape {
                shape: read(&p)?,
                from: p.display().to_string(),
            })
        }
        ModelSource::Gguf { file } => Ok(Shape {
            shape: shape_of_gguf(&file)?,
            from: format!("{} (GGUF metadata)", file.display()),
        }),
        ModelSource::Hub { repo, revision } => {
            let rev = revision.unwrap_or_else(|| "main".into());
            let cached = CachedRepo::new(cache_dir, RepoKind::Model, &repo);
            if let Some(p) = cached.file(&rev, "config.json") {
                return Ok(Shape {
                    shape: read(&p)?,
                    from: format!("{} (hub cache)", p.display()),
                });
            }
            let Some((_, text)) = KNOWN_CONFIGS.iter().find(|(r, _)| *r == repo) else {
                bail!(
                    "{}: the config.json of {repo}@{rev} is not in the hub cache {} and the plan has no built-in shape for it; run `saepipe download {}` first",
                    pipeline.path.display(),
                    cache_dir.display(),
                    pipeline.path.display()
                );
            };
            let origin = PathBuf::from(format!("(built-in shape of {repo})"));
            Ok(Shape {
                shape: shape_of_config(&origin, text)?,
                from: format!(
                    "built-in table of saepipe (copied from {repo}'s config.json; it is not in the hub cache {}) — model {}",
                    cache_dir.display(),
                    c.model.source
                ),
            })
        }
    }
}

/// Peak memory of the capture forward pass: the weights (in `model.dtype`) plus the
/// working set of one batch (an estimate: the residual stream and its copies, the MLP's
/// hidden activations, the attention scores, each hookpoint's recording and its f32 rows).
pub fn capture_peak_bytes(c: &PipelineConfig, s: &ModelShape) -> u64 {
    let (b, t) = (c.capture.batch_size as u64, c.data.context_len as u64);
    let d = s.info.d_model as u64;
    let weights = c.model.dtype.candle().size_in_bytes() as u64 * s.params;
    let block =
        4 * b * t * (8 * d + 3 * s.intermediate_size as u64) + 4 * 2 * b * s.n_heads as u64 * t * t;
    let hooks = c.capture.hookpoints.len() as u64 * 3 * 4 * b * t * d;
    weights + block + hooks
}

/// One lockstep training group of the plan.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// Its hookpoint.
    pub hookpoint: String,
    /// Its SAEs (point ids).
    pub units: Vec<String>,
    /// Tokens per step.
    pub batch_tokens: usize,
    /// Peak memory: SAE states (the group cap's arithmetic), the shuffle buffer, and each
    /// SAE's step buffers (pre-activations, codes and their gradients; input and output).
    pub peak_bytes: u64,
    /// Bytes the group's SAEs write (f32 weights) plus their checkpoints while training.
    pub disk_bytes: u64,
    /// Steps of the longest SAE.
    pub steps: u64,
}

/// The training groups of every unit, as the train stage forms them.
pub fn group_plans(pipeline: &Pipeline, d: usize) -> Result<Vec<GroupPlan>> {
    let all = super::unit::units(pipeline, None)?;
    let mut out = Vec::new();
    for g in super::train::all_groups(&all, d) {
        let batch = g[0].point.config.train.batch_tokens;
        let t = &pipeline.config.train;
        let rows = (t.shuffle_buffer_bytes / (4 * d as u64)).max(2 * batch as u64);
        let mut peak = rows * 4 * d as u64;
        let mut disk = 0;
        let mut steps = 0;
        for u in &g {
            let d_sae = u.point.config.sae.d_sae(d);
            peak += super::train::sae_state_bytes(d, d_sae)
                + 4 * batch as u64 * (4 * d_sae as u64 + 3 * d as u64);
            let weights = 4 * (2 * d * d_sae + d_sae + d) as u64;
            disk += weights + 3 * weights;
            steps = steps.max(u.point.config.trainer_config().total_tokens / batch as u64);
        }
        out.push(GroupPlan {
            hookpoint: g[0].hookpoint.to_string(),
            units: g.iter().map(|u| u.point.id.clone()).collect(),
            batch_tokens: batch,
            peak_bytes: peak,
            disk_bytes: disk,
            steps,
        });
    }
    Ok(out)
}

/// The streamed run's chunk plan at `capture.disk_budget_bytes`, from the planned shard
/// rows (`None` unless `capture.keep = false` with a budget).
pub fn streamed_plan(c: &PipelineConfig, d: usize) -> Option<StreamPlan> {
    let budget = c.capture.disk_budget_bytes.filter(|_| !c.capture.keep)?;
    Some(stream_plan(
        &planned_shard_rows(c, c.data.n_tokens),
        &planned_shard_rows(c, c.data.eval_tokens),
        distinct_hookpoints(c),
        d,
        c.capture.dtype,
        budget,
    ))
}

/// The plan as text; `calibrate`: time every stage from a short calibration on this
/// machine ([`super::calibrate`]).
pub fn render(pipeline: &Pipeline, shape: &Shape, calibrate: bool) -> Result<String> {
    use std::fmt::Write;
    let c = &pipeline.config;
    let s = &shape.shape;
    let d = s.info.d_model;
    let mut o = String::new();
    let hp = |x: u64| format!("{} ({x} B)", human_bytes(x));
    writeln!(o, "plan of {}", pipeline.path.display())?;
    writeln!(
        o,
        "model: {} — {} layers, d_model {}, vocab {}, {} parameters ({} as f32)",
        c.model.source,
        s.info.n_layers,
        d,
        s.info.vocab_size,
        s.params,
        human_bytes(4 * s.params)
    )?;
    writeln!(o, "shape from: {}", shape.from)?;
    let n_hp = c.capture.hookpoints.len() as u64;
    writeln!(o, "\ncapture ({} hookpoints, {}, context {}, {} windows per shard; windows are a lower bound):",
        n_hp, c.capture.dtype.name(), c.data.context_len, shard_windows(c))?;
    let tr = set_plan(c, d, c.data.n_tokens);
    let ev = set_plan(c, d, c.data.eval_tokens);
    for (name, p) in [("train", &tr), ("eval", &ev)] {
        writeln!(
            o,
            "  {name}: tokens {} windows {} shards {} bytes per hookpoint {}",
            p.tokens,
            p.windows,
            p.shards,
            hp(p.bytes)
        )?;
    }
    let keep = capture_bytes(c, d);
    let streamed = streamed_min_bytes(c, d);
    writeln!(
        o,
        "  disk, keep everything (capture.keep = true): {}",
        hp(keep)
    )?;
    writeln!(
        o,
        "  disk, streamed (capture.keep = false): capture.disk_budget_bytes, at least {} (held-out sets + 2 training shards per hookpoint)",
        hp(streamed)
    )?;
    if let Some(sp) = streamed_plan(c, d) {
        let budget = sp.budget_bytes;
        if sp.fits() {
            let per: Vec<usize> = sp.chunks.iter().map(|ch| ch.shards.len()).collect();
            writeln!(
                o,
                "  streamed at the configured capture.disk_budget_bytes = {budget} ({}): {} chunks of {}..={} training shards, peak disk {} (held-out split {} + the largest chunk; minimum budget {})",
                human_bytes(budget),
                sp.chunks.len(),
                per.iter().min().unwrap_or(&0),
                per.iter().max().unwrap_or(&0),
                hp(sp.peak_bytes()),
                human_bytes(sp.eval_est_bytes),
                hp(sp.min_budget)
            )?;
        } else {
            writeln!(
                o,
                "  streamed at the configured capture.disk_budget_bytes = {budget} ({}): BELOW THE MINIMUM {} (held-out split {} + two training shards {}); `saepipe run` refuses it: raise the budget, or lower capture.shard_tokens / data.eval_tokens",
                human_bytes(budget),
                hp(sp.min_budget),
                human_bytes(sp.eval_est_bytes),
                human_bytes(sp.pair_bytes)
            )?;
        }
        writeln!(
            o,
            "    (chunks from the planned shard rows; the run plans them again from the tokenized data, which can only have fewer rows per shard)"
        )?;
    }
    writeln!(
        o,
        "  peak memory (estimate, {} weights): {}",
        c.model.dtype.name(),
        hp(capture_peak_bytes(c, s))
    )?;
    let groups = group_plans(pipeline, d)?;
    writeln!(
        o,
        "\ntrain ({} SAEs in {} lockstep groups):",
        groups.iter().map(|g| g.units.len()).sum::<usize>(),
        groups.len()
    )?;
    let mut train_disk = 0;
    for (i, g) in groups.iter().enumerate() {
        writeln!(
            o,
            "  group {i}: {} × {} SAEs, batch {}, {} steps, peak memory {}, disk {}",
            g.hookpoint,
            g.units.len(),
            g.batch_tokens,
            g.steps,
            hp(g.peak_bytes),
            hp(g.disk_bytes)
        )?;
        train_disk += g.disk_bytes;
    }
    writeln!(
        o,
        "  disk (SAE folders, checkpoints while training): {}",
        hp(train_disk)
    )?;
    writeln!(
        o,
        "\ntotal disk (activations + SAE folders; model and dataset files not counted):"
    )?;
    writeln!(o, "  keep everything: {}", hp(keep + train_disk))?;
    writeln!(o, "  streamed: at least {}", hp(streamed + train_disk))?;
    if !calibrate {
        writeln!(o, "\ntime: not estimated (--no-calibrate)")?;
        return Ok(o);
    }
    let cal = super::calibrate::calibrate(pipeline, s)?;
    let fmt_s = super::calibrate::fmt_s;
    writeln!(
        o,
        "\ntime (estimate from a calibration on this machine that took {}: {}):",
        fmt_s(cal.seconds),
        cal.what
    )?;
    let mut total = Some(0.0);
    for st in &cal.stages {
        match st.seconds {
            Some(sec) => {
                writeln!(
                    o,
                    "  {}: {sec:.3} s ({}) = {}",
                    st.stage,
                    fmt_s(sec),
                    st.how
                )?;
                total = total.map(|t| t + sec);
            }
            None => {
                writeln!(o, "  {}: {}", st.stage, st.how)?;
                total = None;
            }
        }
    }
    match total {
        Some(t) => writeln!(
            o,
            "  total: {t:.3} s ({}; download, reading text, JSAE and checkpoints not counted)",
            fmt_s(t)
        )?,
        None => writeln!(o, "  total: not estimated (a stage above is not)")?,
    }
    if cal.extrapolated.is_empty() {
        writeln!(
            o,
            "  extrapolated: nothing (every size was timed as configured)"
        )?;
    } else {
        writeln!(o, "  extrapolated:")?;
        for e in &cal.extrapolated {
            writeln!(o, "    - {e}")?;
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The formula's inputs, pinned: weights at the model dtype's width (measured: a
    /// Pythia-1B-shaped f32 capture and a SmolLM3-3B-shaped bf16 one peak within 2% of it,
    /// README), plus one batch's working set and each hookpoint's recording.
    #[test]
    fn capture_peak_is_weights_in_the_model_dtype_plus_one_batch() {
        let text = std::fs::read_to_string("pipelines/smoke.toml").unwrap();
        let (_, pythia) = super::KNOWN_CONFIGS[0];
        let s = crate::models::shape::shape_of_config(Path::new("c.json"), pythia).unwrap();
        // smoke.toml: batch 4, context 32, 2 hookpoints; Pythia-1B: d 2048, d_ff 8192, 8 heads.
        let (b, t, d, ff, h) = (4u64, 32u64, 2048u64, 8192u64, 8u64);
        let batch = 4 * b * t * (8 * d + 3 * ff) + 8 * b * h * t * t + 2 * 12 * b * t * d;
        for (dtype, width) in [("f32", 4), ("bf16", 2), ("f16", 2)] {
            let sets = [format!("model.dtype={dtype}")];
            let p = crate::config::from_str(&text, Path::new("smoke.toml"), &sets).unwrap();
            assert_eq!(
                super::capture_peak_bytes(&p.config, &s),
                width * s.params + batch,
                "{dtype}"
            );
        }
    }
}
