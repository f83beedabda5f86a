//! CE-loss splicing for the evaluation and JSAE stages: the model and held-out windows
//! ([`CeContext`]), the clean CE, and the CE with a hookpoint zeroed or replaced
//! (`pipeline.md` §5, CE-loss delta).

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::capture::spec_from_pipeline;
use crate::config::Pipeline;
use crate::data::pack::{special_token_ids, SpecialIds, Window, WindowStream};
use crate::data::Split;
use crate::hub::HubOptions;
use crate::models::{HookedModel, Hookpoint, NoHooks, Replace};
use crate::util::progress::Reporter;

/// The model and held-out windows used for CE-loss metrics.
pub(crate) struct CeContext {
    pub(crate) model: Box<dyn HookedModel>,
    pub(crate) windows: Vec<Window>,
    pub(crate) special: Vec<u32>,
    pub(crate) clean: f64,
}

/// Load the model, the held-out CE windows and the clean CE.
pub(crate) fn ce_context(
    pipeline: &Pipeline,
    opts: &HubOptions,
    reporter: &dyn Reporter,
) -> Result<CeContext> {
    let c = &pipeline.config;
    let (resolved, loaded) =
        crate::pipeline::capture::load_pipeline_model(pipeline, opts, reporter)?;
    let dataset = crate::hub::resolve_dataset(&c.data, opts, reporter)
        .context("resolving the dataset of [data]")?;
    let tokenizer = Arc::new(loaded.tokenizer.with_context(|| {
        format!(
            "{}: no tokenizer found next to the weights",
            resolved.path.display()
        )
    })?);
    let info = loaded.model.info().clone();
    let special_ids = SpecialIds {
        bos: info.bos_token_id,
        eos: info.eos_token_ids.first().copied(),
        pad: info.pad_token_id,
    };
    let spec = spec_from_pipeline(pipeline, String::new(), &dataset.files, false);
    let stream = WindowStream::new(
        &spec.source,
        tokenizer.clone(),
        &spec.pack,
        spec.split,
        Split::Eval,
        special_ids,
    )?;
    let windows: Vec<Window> = stream
        .take(c.eval.ce_sequences)
        .collect::<Result<_, _>>()
        .context("reading the held-out windows for CE")?;
    if windows.is_empty() {
        anyhow::bail!(
            "no held-out windows for the CE-loss metrics: raise data.eval_fraction and run `saepipe run {} --force`, or set eval.ce_sequences = 0 (no CE columns)",
            pipeline.path.display()
        );
    }
    let special = special_token_ids(&tokenizer, special_ids, &info.eos_token_ids);
    let mut ctx = CeContext {
        model: loaded.model,
        windows,
        special,
        clean: 0.0,
    };
    ctx.clean = ce_of(
        &ctx,
        Hookpoint::new(0, crate::models::Site::ResidPre),
        Mode::Clean,
    )
    .context("clean CE")?;
    Ok(ctx)
}

/// What a CE forward pass does at the hookpoint.
pub(crate) enum Mode<'a> {
    /// Nothing: the clean model.
    Clean,
    /// Replace the activation with zeros.
    Zero,
    /// Replace the activation with `f(x, windows of this batch)`.
    Splice(&'a mut dyn FnMut(&Tensor, &[Window]) -> candle_core::Result<Tensor>),
}

/// Mean next-token CE (nats) over the CE windows, with `hp` treated as `mode` says.
pub(crate) fn ce_of(ctx: &CeContext, hp: Hookpoint, mut mode: Mode) -> Result<f64> {
    ce_with(ctx, &hp.to_string(), &mut |ids_t, chunk| match &mut mode {
        Mode::Clean => ctx.model.forward_hooked(ids_t, &mut NoHooks, None),
        Mode::Zero => {
            let mut hook = Replace {
                target: hp,
                f: |x: &Tensor| x.zeros_like(),
            };
            ctx.model.forward_hooked(ids_t, &mut hook, None)
        }
        Mode::Splice(g) => {
            let mut hook = Replace {
                target: hp,
                f: |x: &Tensor| g(x, chunk),
            };
            ctx.model.forward_hooked(ids_t, &mut hook, None)
        }
    })
}

/// A forward pass over one chunk of CE windows, returning its logits.
pub(crate) type ChunkForward<'a> =
    dyn FnMut(&Tensor, &[Window]) -> candle_core::Result<Option<Tensor>> + 'a;

/// Mean next-token CE (nats) over the CE windows, `forward(ids, windows)` running the model
/// (with whatever hooks) on each chunk of windows and returning its logits.
pub(crate) fn ce_with(ctx: &CeContext, label: &str, forward: &mut ChunkForward) -> Result<f64> {
    let dev = ctx.model.device().clone();
    let (mut sum, mut count) = (0.0f64, 0u64);
    for chunk in ctx.windows.chunks(4) {
        let s = chunk[0].ids.len();
        let ids: Vec<u32> = chunk.iter().flat_map(|w| w.ids.iter().copied()).collect();
        let ids_t = Tensor::from_vec(ids.clone(), (chunk.len(), s), &dev)?;
        let logits = forward(&ids_t, chunk)?.context("the forward pass stopped early")?;
        let logits = logits.to_dtype(DType::F32)?;
        let (b, s2, v) = logits.dims3()?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        for (bi, w) in chunk.iter().enumerate().take(b) {
            for t in 0..s2.saturating_sub(1) {
                let target = ids[bi * s + t + 1];
                if t + 1 >= w.n_real || ctx.special.contains(&target) {
                    continue;
                }
                sum += row_nll(&flat[(bi * s2 + t) * v..(bi * s2 + t + 1) * v], target);
                count += 1;
            }
        }
    }
    anyhow::ensure!(count > 0, "no predicted positions in the CE windows");
    let ce = sum / count as f64;
    anyhow::ensure!(ce.is_finite(), "CE is not finite ({ce}) at {label}");
    Ok(ce)
}

/// −log softmax(`row`)[`target`] in f64 (one predicted position of [`ce_with`]; also what
/// `saepipe plan`'s calibration times per position).
pub(crate) fn row_nll(row: &[f32], target: u32) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
    lse - row[target as usize] as f64
}
