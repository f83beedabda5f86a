//! The evaluate stage: every trained SAE on the held-out activations, its cost when spliced
//! into the model, then the result tables, the plot and a terminal summary.
//!
//! Implements `pipeline.md` §1 (`saepipe evaluate`), §4 (results) and `sae_variants.md` §7.
//! Reconstruction metrics are the streaming accumulators of [`crate::eval`] (pooled R²
//! with f64 sums, in raw activation space: the exported SAE has its input scaling folded
//! in). CE-loss terms are computed here:
//!
//! ```text
//! CE(model)      = mean over predicted positions t of −log softmax(logits_t)[id_{t+1}]
//!                  (targets that are special tokens, and padding, are excluded)
//! ce_delta       = CE_spliced − CE_clean
//! ce_loss_score  = (CE_zero_abl − CE_spliced) / (CE_zero_abl − CE_clean)
//! dead_frac      = share of latents with no activation in the last `eval.dead_window_tokens`
//!                  evaluation tokens (all of them when unset)
//! dense_frac     = share of latents active on more than 10% of evaluation tokens
//! ```
//!
//! Decision: a `[synthetic]` pipeline is evaluated on the held-out stream of its
//! dictionary (a seed stream disjoint from training), without CE terms (null), and with
//! `feature_recovery` = MMCS of the exported decoder rows against the true directions.
//! Decision: the SAE replaces the activation at every position except those holding a
//! special token (BOS etc.), which it never saw in training (`sae_variants.md` §7.4 "keep
//! BOS clean"). Zero ablation replaces all positions with zeros.
//! Decision: the CE sequences are the first `eval.ce_sequences` windows of the held-out
//! split, so clean, zero-ablated and spliced CE are measured on the same tokens.
//! Decision: TopK and AbsTopK files are encoded by [`power::encode`] (the same codes, plus
//! the K + R best sites per token), which feeds the power-diagram diagnostics
//! (`pd_*` columns, `crate::eval::power`); their local-affine gap reads the held-out
//! activations a second time for the per-cell covariances.
//! A unit's `metrics.json` is its completion marker; it records the point hash.
//! Decision (issue 15): evaluate unit `i` is train unit `i` (the JSAE pairs evaluate as
//! part of their train unit); [`evaluate_one`] writes only that unit's `metrics.json`, and
//! [`results_stage`] (`saepipe results`) merges every unit's record into the tables and
//! the plot, exactly as the whole stage does at its end.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::ce::{ce_context, ce_of, CeContext, Mode};
use super::results::{self, MetricsRow};
use super::train::{read_done, units, Unit};
use crate::config::Pipeline;
use crate::config::TrainBackend;
use crate::data::pack::Window;
use crate::data::Split;
use crate::eval::power::{self, PowerConfig, PowerSpec, PowerStats};
use crate::eval::Metrics;
use crate::hub::HubOptions;
use crate::models::Hookpoint;
use crate::pipeline::capture::activations_dir;
use crate::sae::export::LoadedSae;
use crate::sae::export_tensor::DeviceSae;
use crate::sae::Workspace;
use crate::store::reader::{ActivationSet, Expect};
use crate::store::set_dir;
use crate::synthetic::{mmcs, SyntheticData};
use crate::util::progress::Reporter;

/// A unit's evaluation record and completion marker.
pub use super::train::METRICS_FILE;

/// Rows per evaluation batch.
const EVAL_BATCH: usize = 4096;

/// What `metrics.json` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct MetricsFile {
    point_hash: String,
    row: MetricsRow,
    /// sha256 of the weights evaluated (train_done.json's; absent in older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights_sha256: Option<String>,
}

impl MetricsFile {
    /// Whether this is the evaluation of `u` as it is trained now (`done` its marker).
    fn is_of(&self, u: &Unit, done: Option<&super::train::TrainDone>) -> bool {
        self.point_hash == u.point.hash
            && self.row.point_id == u.point.id
            && self.row.hookpoint == u.hookpoint.to_string()
            && done.and_then(|d| d.weights_sha256.as_ref()) == self.weights_sha256.as_ref()
    }
}

/// Evaluate every trained unit that has no up-to-date `metrics.json` (all with `force`),
/// then write `results/metrics.parquet`, `results/pareto.parquet`, `results/pareto.svg`
/// and return the summary table printed at the end.
pub fn evaluate_stage(
    pipeline: &Pipeline,
    opts: &HubOptions,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<String> {
    let all = units(pipeline, None)?;
    // Refuse, before anything is evaluated or written, a folder that holds another unit's SAE.
    let mut foreign = Vec::new();
    for u in &all {
        if let Some(m) = super::unit_check::check_unit_folder(u)? {
            foreign.push(format!("  - {}: {m}", u.dir.display()));
        }
    }
    if !foreign.is_empty() {
        anyhow::bail!(
            "{} SAE folder{} of {} do{} not hold the SAE of {} unit:\n{}\nNothing was evaluated and the results in {} are left as they are. Run `saepipe train {}` (with the same --set options) to train {} again: train replaces a folder that does not match its unit",
            foreign.len(),
            if foreign.len() == 1 { "" } else { "s" },
            pipeline.path.display(),
            if foreign.len() == 1 { "es" } else { "" },
            if foreign.len() == 1 { "its" } else { "their" },
            foreign.join("\n"),
            pipeline.run_dir().join("results").display(),
            pipeline.path.display(),
            if foreign.len() == 1 { "it" } else { "them" },
        );
    }
    let trained: Vec<&Unit> = all
        .iter()
        .filter(|u| read_done(&u.dir).is_some_and(|d| d.point_hash == u.point.hash))
        .collect();
    if trained.is_empty() && crate::pipeline::jsae::metric_rows(pipeline).is_empty() {
        anyhow::bail!(
            "nothing to evaluate: none of the {} SAEs of {} is trained in {}; run `saepipe train {}` (or `saepipe run`) first. The results in {} are left as they are",
            all.len(),
            pipeline.path.display(),
            pipeline.run_dir().join("saes").display(),
            pipeline.path.display(),
            pipeline.run_dir().join("results").display()
        );
    }
    if trained.len() < all.len() {
        reporter.message(&format!(
            "evaluate: {} of {} SAEs are not trained yet (run `saepipe train`); evaluating the rest",
            all.len() - trained.len(),
            all.len()
        ));
    }
    evaluate_list(pipeline, opts, &trained, force, reporter)?;
    results_stage(pipeline)
}

/// Evaluate unit `index` (= train unit `index`) alone, holding its unit lock, and write
/// its `metrics.json`; an evaluated unit is skipped. The tables are left to
/// [`results_stage`].
pub fn evaluate_one(
    pipeline: &Pipeline,
    opts: &HubOptions,
    index: usize,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<()> {
    let all = units(pipeline, None)?;
    let Some(u) = all.get(index) else {
        anyhow::bail!(
            "evaluate unit {index} does not exist: {} has {} SAE units (see `saepipe units`)",
            pipeline.path.display(),
            all.len()
        );
    };
    let _lock = crate::util::lock::UnitLock::acquire(&u.dir.join(super::train::UNIT_LOCK))?;
    if let Some(m) = super::unit_check::check_unit_folder(u)? {
        anyhow::bail!(
            "{} does not hold the SAE of unit {index}: {m}. Nothing was evaluated; run `saepipe train {} --unit {index}` to train it again: train replaces a folder that does not match its unit",
            u.dir.display(),
            pipeline.path.display()
        );
    }
    if read_done(&u.dir).is_none_or(|d| d.point_hash != u.point.hash) {
        anyhow::bail!(
            "unit {index} ({} at {}) is not trained in {}; run `saepipe train {} --unit {index}` first",
            u.point.id,
            u.hookpoint,
            u.dir.display(),
            pipeline.path.display()
        );
    }
    evaluate_list(pipeline, opts, &[u], force, reporter)
}

/// Evaluate those of the `trained` units that have no up-to-date `metrics.json`.
fn evaluate_list(
    pipeline: &Pipeline,
    opts: &HubOptions,
    trained: &[&Unit],
    force: bool,
    reporter: &dyn Reporter,
) -> Result<()> {
    let pending: Vec<&Unit> = trained
        .iter()
        .copied()
        .filter(|u| {
            force || read_metrics(&u.dir).is_none_or(|m| !m.is_of(u, read_done(&u.dir).as_ref()))
        })
        .collect();
    if pending.is_empty() && trained.len() == 1 {
        reporter.message("evaluate: this unit is already evaluated");
    }
    if !pending.is_empty()
        && pipeline.config.synthetic.is_none()
        && pipeline.config.data.eval_tokens == 0
    {
        anyhow::bail!(
            "evaluation reads the held-out split, but data.eval_tokens is 0 in {}, so none was captured: set data.eval_tokens > 0 (e.g. --set data.eval_tokens=1024, with data.eval_fraction > 0) and run `saepipe run {} --force` (the capture, and so every SAE, depends on it). The results in {} are left as they are",
            pipeline.path.display(),
            pipeline.path.display(),
            pipeline.run_dir().join("results").display()
        );
    }
    if !pending.is_empty() {
        let ce = if pipeline.config.eval.ce_sequences > 0 && pipeline.config.synthetic.is_none() {
            Some(ce_context(pipeline, opts, reporter)?)
        } else {
            None
        };
        let mut hps: Vec<Hookpoint> = pending.iter().map(|u| u.hookpoint).collect();
        hps.sort();
        hps.dedup();
        let prog = reporter.start("evaluate", Some(pending.len() as u64));
        if let Some(syn) = &pipeline.config.synthetic {
            let truth = syn.data();
            for u in &pending {
                prog.set_message(format!("{} (synthetic)", u.point.id));
                let data = EvalData::Synthetic {
                    truth: &truth,
                    seed: syn.eval_seed(),
                    rows: pipeline.config.data.eval_tokens,
                };
                let row = evaluate_unit(pipeline, u, &data, None, None)
                    .with_context(|| format!("evaluating {}", u.dir.display()))?;
                write_metrics(u, row)?;
                prog.advance(1);
            }
        }
        for hp in hps
            .into_iter()
            .filter(|_| pipeline.config.synthetic.is_none())
        {
            let dir = set_dir(&activations_dir(pipeline), hp, Split::Eval);
            let set = ActivationSet::open(
                &dir,
                &Expect {
                    hookpoint: Some(hp.to_string()),
                    split: Some("eval".into()),
                    ..Expect::default()
                },
            )
            .with_context(|| {
                let fix = if pipeline.config.data.eval_tokens == 0 {
                    format!(
                        "data.eval_tokens is 0, so no held-out split was captured: set it > 0 (e.g. --set data.eval_tokens=1024) and run `saepipe run {} --force` (the capture, and so every SAE, depends on it)",
                        pipeline.path.display()
                    )
                } else {
                    format!(
                        "run `saepipe capture {}` (it resumes, and captures a missing or damaged shard again)",
                        pipeline.path.display()
                    )
                };
                format!("opening the held-out {hp} activations in {}; {fix}", dir.display())
            })?;
            let zero = match &ce {
                Some(c) => Some(
                    ce_of(c, hp, Mode::Zero)
                        .with_context(|| format!("zero-ablation CE at {hp}"))?,
                ),
                None => None,
            };
            for u in pending.iter().filter(|u| u.hookpoint == hp) {
                prog.set_message(format!("{} @ {hp}", u.point.id));
                let row = evaluate_unit(pipeline, u, &EvalData::Set(&set), ce.as_ref(), zero)
                    .with_context(|| format!("evaluating {}", u.dir.display()))?;
                write_metrics(u, row)?;
                prog.advance(1);
            }
        }
        prog.finish();
    }
    Ok(())
}

/// Merge the `metrics.json` of every trained unit (and the JSAE records) into
/// `results/metrics.parquet`, `results/pareto.parquet` and `results/pareto.svg`; returns
/// the summary table. `saepipe results`, and the end of the evaluate stage.
pub fn results_stage(pipeline: &Pipeline) -> Result<String> {
    let all = units(pipeline, None)?;
    let trained: Vec<&Unit> = all
        .iter()
        .filter(|u| read_done(&u.dir).is_some_and(|d| d.point_hash == u.point.hash))
        .collect();
    let missing = trained
        .iter()
        .filter(|u| read_metrics(&u.dir).is_none_or(|m| !m.is_of(u, read_done(&u.dir).as_ref())))
        .count();
    if missing > 0 || trained.len() < all.len() {
        tracing::warn!(
            "results: {} of {} SAE units have no up-to-date metrics yet (train / evaluate them, e.g. `saepipe evaluate --unit I`); the tables hold the rest",
            all.len() - trained.len() + missing,
            all.len()
        );
    }
    let mut rows: Vec<MetricsRow> = trained
        .iter()
        .filter_map(|u| {
            read_metrics(&u.dir)
                .filter(|m| m.is_of(u, read_done(&u.dir).as_ref()))
                .map(|m| m.row)
        })
        .collect();
    // JSAE pairs (`[jsae]`) keep their own records; their rows join the same tables.
    rows.extend(crate::pipeline::jsae::metric_rows(pipeline));
    let out = pipeline.run_dir().join("results");
    results::write_results(&out, &rows)
        .with_context(|| format!("writing results into {}", out.display()))?;
    if !rows.is_empty() {
        super::plot::plot_pareto(
            &out.join("pareto.svg"),
            &rows,
            &format!("{}: R² vs L0 on held-out tokens", pipeline.config.run.name),
        )?;
    }
    Ok(summary_table(&rows))
}

/// Write a unit's `metrics.json` (its completion marker) atomically.
fn write_metrics(u: &Unit, row: MetricsRow) -> Result<()> {
    let text = serde_json::to_string_pretty(&MetricsFile {
        point_hash: u.point.hash.clone(),
        row,
        weights_sha256: read_done(&u.dir).and_then(|d| d.weights_sha256),
    })?;
    crate::util::fs::atomic_write(&u.dir.join(METRICS_FILE), text.as_bytes())
        .with_context(|| format!("writing {}", u.dir.join(METRICS_FILE).display()))
}

/// The held-out rows of an evaluation.
enum EvalData<'a> {
    /// Captured activations.
    Set(&'a ActivationSet),
    /// The held-out stream of a synthetic dictionary (also the ground truth).
    Synthetic {
        truth: &'a SyntheticData,
        seed: u64,
        rows: u64,
    },
}

impl EvalData<'_> {
    fn d(&self) -> usize {
        match self {
            EvalData::Set(s) => s.d_model(),
            EvalData::Synthetic { truth, .. } => truth.cfg.d,
        }
    }
    fn n_tokens(&self) -> u64 {
        match self {
            EvalData::Set(s) => s.n_tokens(),
            EvalData::Synthetic { rows, .. } => *rows,
        }
    }
    fn revision(&self) -> String {
        match self {
            EvalData::Set(s) => s.manifest.meta.model_revision.clone(),
            EvalData::Synthetic { .. } => "synthetic".into(),
        }
    }
    /// Call `f` on batches of at most [`EVAL_BATCH`] rows until it returns false.
    fn for_each(&self, mut f: impl FnMut(&[f32]) -> Result<bool>) -> Result<()> {
        match self {
            EvalData::Set(set) => {
                for batch in set.batches(EVAL_BATCH) {
                    if !f(&batch?.act)? {
                        break;
                    }
                }
            }
            EvalData::Synthetic { truth, seed, rows } => {
                let mut buf = Vec::new();
                let mut at = 0u64;
                while at < *rows {
                    let n = (EVAL_BATCH as u64).min(rows - at) as usize;
                    buf.clear();
                    truth.rows(at, n, *seed, &mut buf);
                    at += n as u64;
                    if !f(&buf)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

fn read_metrics(dir: &Path) -> Option<MetricsFile> {
    let text = std::fs::read_to_string(dir.join(METRICS_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn evaluate_unit(
    pipeline: &Pipeline,
    u: &Unit,
    data: &EvalData,
    ce: Option<&CeContext>,
    zero: Option<f64>,
) -> Result<MetricsRow> {
    let sae = LoadedSae::load(&u.dir)?;
    let done = read_done(&u.dir).context("train_done.json vanished")?;
    let (d, f) = (sae.t.d_in, sae.t.d_sae);
    anyhow::ensure!(
        d == data.d(),
        "the SAE has d_in = {d} but the held-out activations have d_model = {}",
        data.d()
    );
    let cfg = &pipeline.config.eval;
    let limit = cfg.eval_tokens.unwrap_or(u64::MAX).min(data.n_tokens());
    let mut metrics = Metrics::new(d, f);
    // A unit trained on the tensor backend is evaluated on tensors too, on train.device
    let dsae = device_sae(u, &sae)?;
    // TopK / AbsTopK files: the same encode, plus the power-diagram candidates (eval/power.rs;
    // kernels only: a tensor-encoded unit leaves the pd_* columns null)
    let power_spec =
        PowerSpec::of(&sae.t).filter(|_| cfg.power_candidates != Some(0) && dsae.is_none());
    let mut pd = power_spec.map(|spec| {
        let pc = PowerConfig {
            candidates: cfg.power_candidates.unwrap_or(power::DEFAULT_CANDIDATES),
            min_cell_tokens: cfg.power_min_cell_tokens,
        };
        (spec, PowerStats::new(&sae.t, spec, pc))
    });
    let mut last_fire = vec![0u64; f];
    let mut ws = Workspace::default();
    let mut recon = Vec::new();
    let mut seen = 0u64;
    data.for_each(|act| {
        let n = (act.len() / d).min((limit - seen) as usize);
        if n == 0 {
            return Ok(false);
        }
        let x = &act[..n * d];
        crate::util::error::ensure_finite(x, "held-out activations", None)?;
        if let Some(ds) = &dsae {
            ds.run(x, n, &mut ws, &mut recon)
                .with_context(|| format!("{}: tensor evaluation encode", u.point.id))?;
        } else {
            match &pd {
                Some((spec, p)) => power::encode(&sae.t, *spec, p.candidates(), x, n, &mut ws),
                None => sae.encode(x, n, &mut ws),
            }
            let codes = std::mem::take(&mut ws.codes);
            sae.decode(&codes, &mut recon, &mut ws);
            ws.codes = codes;
        }
        crate::util::error::ensure_finite(&recon, "SAE reconstruction", None)?;
        metrics.update(x, &recon, &ws.codes);
        if let Some((_, p)) = pd.as_mut() {
            p.update(x, &recon, &ws.aux, &sae.t.w_enc);
        }
        for b in 0..ws.codes.n() {
            let (ix, vs) = ws.codes.row(b);
            for (&i, &v) in ix.iter().zip(vs) {
                if v != 0.0 {
                    last_fire[i as usize] = seen + b as u64 + 1;
                }
            }
        }
        seen += n as u64;
        Ok(seen < limit)
    })?;
    anyhow::ensure!(seen > 0, "no held-out tokens to evaluate on");
    // the local-affine gap: a second pass over the same tokens for the covariances
    if let Some((_, p)) = pd.as_mut() {
        if p.begin_affine() {
            let mut at = 0u64;
            data.for_each(|act| {
                let n = (act.len() / d).min((seen - at) as usize);
                if n == 0 {
                    return Ok(false);
                }
                p.affine_update(&act[..n * d], &sae.t.b_dec);
                at += n as u64;
                Ok(at < seen)
            })?;
        }
    }
    let power_values = pd
        .map(|(_, p)| p.finish((metrics.recon.sst() / seen as f64).max(0.0).sqrt()))
        .unwrap_or_default();
    let m = metrics.finish();
    if !m.r2.is_finite() {
        tracing::warn!(
            "{}: the {seen} held-out activations have no variance to explain (below {} of their mean square): R² and FVU are left null for {}",
            u.hookpoint,
            crate::eval::VARIANCE_FLOOR,
            u.point.id
        );
    }
    let window = cfg.dead_window_tokens.unwrap_or(seen).min(seen);
    let dead = last_fire
        .iter()
        .filter(|&&t| t == 0 || t <= seen - window)
        .count();
    let (ce_clean, ce_spliced, ce_zero) = match ce {
        Some(ctx) => {
            // Splice the reconstruction in, keeping special-token positions clean.
            let mut splice = |x: &Tensor, windows: &[Window]| {
                splice_sae(&sae, dsae.as_ref(), &ctx.special, x, windows)
            };
            let spliced = ce_of(ctx, u.hookpoint, Mode::Splice(&mut splice))?;
            (Some(ctx.clean), Some(spliced), zero)
        }
        None => (None, None, None),
    };
    let (sp_name, sp_value) = u.point.config.sae.arch.sparsity_param();
    let c = &pipeline.config;
    Ok(MetricsRow {
        run: c.run.name.clone(),
        point_id: u.point.id.clone(),
        model: c.model.source.clone(),
        revision: data.revision(),
        hookpoint: u.hookpoint.to_string(),
        arch: u.point.config.sae.arch.kind().to_string(),
        d_sae: f as u64,
        expansion: f as f64 / d as f64,
        sparsity_param: sp_name.to_string(),
        sparsity_value: sp_value,
        seed: u.point.config.run.seed,
        optimizer: u.point.config.train.optimizer.kind().into(),
        train_tokens: done.train_tokens,
        eval_tokens: seen,
        r2: m.r2.is_finite().then_some(m.r2),
        fvu: m.fvu.is_finite().then_some(m.fvu),
        mse: m.mse,
        l0: m.l0,
        l1: m.l1,
        dead_frac: dead as f64 / f as f64,
        dense_frac: m.dense_frac_10pct,
        ce_clean,
        ce_spliced,
        ce_delta: ce_spliced.zip(ce_clean).map(|(s, c)| s - c),
        ce_zero_abl: ce_zero,
        ce_loss_score: match (ce_clean, ce_spliced, ce_zero) {
            (Some(c), Some(s), Some(z)) if (z - c).abs() > 1e-12 => Some((z - s) / (z - c)),
            _ => None,
        },
        bipolar_frac: Some(m.bipolar_frac),
        bipolar_var_share: Some(m.bipolar_var_share),
        jacobian_sparsity: None,
        jacobian_frac_0_005: None,
        jacobian_frac_0_015: None,
        jacobian_frac_0_02: None,
        jacobian_frac_0_1: None,
        jacobian_frac_1: None,
        jacobian_mean_abs: None,
        jacobian_rms_frac_0_1: None,
        jacobian_rms_frac_1: None,
        jsae_lambda: None,
        feature_recovery: match data {
            EvalData::Synthetic { truth, .. } => Some(mmcs(&truth.dict, &sae.t.w_dec, d)),
            EvalData::Set(_) => None,
        },
        n_regions: (sae.t.architecture == "kmeans").then(|| sae.t.extra_usize("n_clusters") as u64),
        train_seconds: done.train_seconds,
        train_tokens_per_s: done.train_tokens as f64 / done.train_seconds.max(1e-9),
        sae_path: u.dir.display().to_string(),
        power: power_values,
    })
}

/// The unit's SAE on its `train.device` when it was trained on the tensor backend
/// (`train.backend = "tensor"`, the default for `train.device = "cuda"`): evaluation then
/// encodes on tensors ([`DeviceSae`]); `None` = the kernels.
fn device_sae(u: &Unit, sae: &LoadedSae) -> Result<Option<DeviceSae>> {
    let c = &u.point.config;
    if c.train.backend(&c.model) != TrainBackend::Tensor {
        return Ok(None);
    }
    let device = c.train.device(&c.model).open("train.device")?;
    Ok(Some(sae.t.to_device(&device).with_context(|| {
        format!("{}: loading the SAE onto train.device", u.point.id)
    })?))
}

/// `x [b, s, d]` with every position replaced by the SAE's reconstruction, except those
/// holding a special token of `windows`: on the kernels (`dsae = None`) or on tensors.
pub fn splice_sae(
    sae: &LoadedSae,
    dsae: Option<&DeviceSae>,
    special: &[u32],
    x: &Tensor,
    windows: &[Window],
) -> candle_core::Result<Tensor> {
    let (b, s, dd) = x.dims3()?;
    let keep: Vec<bool> = (0..b * s)
        .map(|at| {
            windows
                .get(at / s)
                .and_then(|w| w.ids.get(at % s))
                .is_some_and(|id| special.contains(id))
        })
        .collect();
    if let Some(ds) = dsae {
        let xf = x
            .to_dtype(DType::F32)?
            .to_device(ds.device())?
            .reshape((b * s, dd))?;
        let out = ds.decode(&ds.encode(&xf)?)?;
        let k: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let k = Tensor::from_vec(k, (b * s, 1), ds.device())?;
        let out = (k.broadcast_mul(&xf)? + k.affine(-1.0, 1.0)?.broadcast_mul(&out)?)?;
        return out
            .reshape((b, s, dd))?
            .to_device(x.device())?
            .to_dtype(x.dtype());
    }
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut ws = Workspace::default();
    let mut out = Vec::new();
    sae.encode(&v, b * s, &mut ws);
    let codes = std::mem::take(&mut ws.codes);
    sae.decode(&codes, &mut out, &mut ws);
    for (at, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
        out[at * dd..(at + 1) * dd].copy_from_slice(&v[at * dd..(at + 1) * dd]);
    }
    Tensor::from_vec(out, (b, s, dd), x.device())?.to_dtype(x.dtype())
}

/// Per hookpoint and arch: the best R² in each L0 band, and the dead fraction there.
pub fn summary_table(rows: &[MetricsRow]) -> String {
    const BANDS: [(f64, f64); 5] = [
        (0.0, 16.0),
        (16.0, 32.0),
        (32.0, 64.0),
        (64.0, 128.0),
        (128.0, f64::INFINITY),
    ];
    let mut keys: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.hookpoint.clone(), r.series()))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out = format!("{:<26} {:<16}", "hookpoint", "arch");
    for (lo, hi) in BANDS {
        let label = if hi.is_finite() {
            format!("L0 {lo:.0}-{hi:.0}")
        } else {
            format!("L0 {lo:.0}+")
        };
        out.push_str(&format!(" {label:>18}"));
    }
    out.push_str("\n (each cell: best R² / dead fraction of that SAE)\n");
    for (hp, arch) in keys {
        out.push_str(&format!("{hp:<26} {arch:<16}"));
        for (lo, hi) in BANDS {
            let best = rows
                .iter()
                .filter(|r| r.hookpoint == hp && r.series() == arch && r.l0 >= lo && r.l0 < hi)
                .filter_map(|r| r.r2.map(|v| (v, r)))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let cell = match best {
                Some((r2, r)) => format!("{r2:.3} / {:.2}", r.dead_frac),
                None => "-".into(),
            };
            out.push_str(&format!(" {cell:>18}"));
        }
        out.push('\n');
    }
    out
}
