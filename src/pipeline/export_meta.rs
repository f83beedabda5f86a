//! What an exported SAE's `cfg.json` `metadata` says about its training data (issue 17
//! item 10): read from the metadata the training activations carry (what capture actually
//! did: BOS, special-token policy, context, dataset, model and revision, stored dtype), not
//! from SAELens defaults. The train and JSAE stages build their [`ExportMeta`] here.
//!
//! ```text
//! cfg.json metadata key          from
//! model_name                     ActMeta.model_repo (= model.source)
//! hook_name                      ActMeta.hookpoint
//! context_size                   ActMeta.context_len
//! prepend_bos                    ActMeta.packing.prepend_bos
//! exclude_special_tokens         ActMeta.exclude_special_tokens
//! saepipe_excluded_token_ids     ActMeta.excluded_token_ids
//! sequence_separator_token       ActMeta.packing.separator ("bos" | "eos" | null), null
//!                                when documents are not concatenated
//! disable_concat_sequences       ActMeta.packing.packing == truncate
//! dataset_path                   data.repo for hub datasets, else ActMeta.dataset
//! saepipe_dataset                ActMeta.dataset (files, text field, txt unit)
//! saepipe_dataset_revision       data.revision (null for local files)
//! saepipe_model_revision         ActMeta.model_revision
//! saepipe_activation_dtype       ActMeta.dtype (the stored activations; weights are f32)
//! saepipe_tokenizer_sha256       ActMeta.tokenizer_sha256
//! ```

use anyhow::{Context, Result};

use crate::config::Pipeline;
use crate::data::{PackSpec, Packing, Separator};
use crate::sae::export::ExportMeta;
use crate::store::schema::ActMeta;

/// The export metadata of an SAE trained on activations described by `act`.
pub fn from_activations(pipeline: &Pipeline, act: &ActMeta) -> Result<ExportMeta> {
    let pack: PackSpec = serde_json::from_str(&act.packing).with_context(|| {
        format!(
            "the {} activations' packing metadata `{}` is not a packing policy; capture them again (`saepipe capture --force`)",
            act.hookpoint, act.packing
        )
    })?;
    let concat = pack.packing == Packing::Concat;
    let separator = match (concat, pack.separator) {
        (false, _) | (true, Separator::None) => None,
        (true, Separator::Bos) => Some("bos".to_string()),
        (true, Separator::Eos) => Some("eos".to_string()),
    };
    let data = &pipeline.config.data;
    Ok(ExportMeta {
        model_name: act.model_repo.clone(),
        hook_name: act.hookpoint.clone(),
        context_size: act.context_len,
        dataset_path: data.repo.clone().unwrap_or_else(|| act.dataset.clone()),
        prepend_bos: pack.prepend_bos,
        exclude_special_tokens: act.exclude_special_tokens,
        excluded_token_ids: act.excluded_token_ids.clone(),
        sequence_separator_token: separator,
        disable_concat_sequences: !concat,
        extra: vec![
            ("saepipe_dataset".into(), act.dataset.clone().into()),
            (
                "saepipe_dataset_revision".into(),
                data.revision.clone().into(),
            ),
            (
                "saepipe_model_revision".into(),
                act.model_revision.clone().into(),
            ),
            (
                "saepipe_activation_dtype".into(),
                act.dtype.name().to_string().into(),
            ),
            (
                "saepipe_tokenizer_sha256".into(),
                act.tokenizer_sha256.clone().into(),
            ),
        ],
    })
}

/// The export metadata of an SAE trained on a `[synthetic]` dictionary's rows: no tokens,
/// so no BOS, no windows and no special tokens.
pub fn synthetic(pipeline: &Pipeline, hook_name: &str) -> ExportMeta {
    ExportMeta {
        model_name: pipeline.config.model.source.clone(),
        hook_name: hook_name.to_string(),
        context_size: 0,
        dataset_path: "synthetic".into(),
        prepend_bos: false,
        exclude_special_tokens: false,
        excluded_token_ids: Vec::new(),
        sequence_separator_token: None,
        disable_concat_sequences: false,
        extra: Vec::new(),
    }
}
