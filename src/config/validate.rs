//! Whole-file checks: sections, hookpoint names, then the semantic rules (ranges, pinned
//! revisions, exactly-one-of, cross-section budgets). Every problem goes into one list.
//!
//! Decision: a hub revision must be pinned; the moving branches `main`/`master` are
//! refused, anything else (a commit sha or a tag such as Pythia's `step143000`) accepted.
//! Decision: local paths are not checked for existence here (a pipeline may be loaded
//! before `saepipe download` or on another machine); `hub::resolve_*` checks them.

use std::collections::BTreeSet;

use toml::{Table, Value};

use super::parse::{self, join, suggest, Problems};
use super::schema::*;
use crate::models::{Hookpoint, ModelSource};

const SECTIONS: [&str; 10] = [
    "run",
    "model",
    "data",
    "capture",
    "train",
    "sae",
    "eval",
    "jsae",
    "sweep",
    "synthetic",
];
/// Model source and hookpoint that stand in for the model in a `[synthetic]` pipeline.
pub const SYNTHETIC_MODEL: &str = "synthetic";
const SYNTHETIC_HOOKPOINT: &str = "blocks.0.hook_resid_post";
const REQUIRED: [&str; 5] = ["run", "model", "data", "capture", "sae"];
const DATA_EXTENSIONS: [&str; 3] = ["txt", "jsonl", "parquet"];

/// Sort key of a problem's key path: its section in file order (unknown sections last,
/// `--set` arguments first).
pub fn section_rank(key: &str) -> usize {
    if key.starts_with("--set") {
        return 0;
    }
    let section = key.split(['.', '[']).next().unwrap_or("");
    SECTIONS
        .iter()
        .position(|s| *s == section)
        .map_or(SECTIONS.len() + 1, |i| i + 1)
}

/// Parse `model.source`; the error is the message for key `model.source`/`model.revision`.
pub fn model_source(m: &ModelConfig) -> Result<ModelSource, (&'static str, String)> {
    let s = m.source.trim();
    if let Some(dir) = s.strip_prefix("local:") {
        if dir.is_empty() {
            return Err((
                "model.source",
                "local: needs a folder, e.g. local:models/tiny".into(),
            ));
        }
        return Ok(ModelSource::Local { dir: dir.into() });
    }
    if let Some(file) = s.strip_prefix("gguf:") {
        if file.is_empty() {
            return Err((
                "model.source",
                "gguf: needs a file, e.g. gguf:models/m.gguf".into(),
            ));
        }
        return Ok(ModelSource::Gguf { file: file.into() });
    }
    if let Err(e) = check_repo_id(s) {
        return Err((
            "model.source",
            format!("{e}; expected a hub repo id \"org/name\", \"local:<dir>\" or \"gguf:<file>\""),
        ));
    }
    let revision =
        pinned_revision(m.revision.as_deref(), s, "model").map_err(|e| ("model.revision", e))?;
    Ok(ModelSource::Hub {
        repo: s.to_string(),
        revision: Some(revision),
    })
}

/// A hub repo id: `name` or `org/name`, letters, digits, `-`, `_`, `.`.
fn check_repo_id(s: &str) -> Result<(), String> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.starts_with('.')
    };
    let parts: Vec<&str> = s.split('/').collect();
    if s.is_empty() {
        return Err("empty".into());
    }
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        return Err(format!("'{s}' is not a hub repo id"));
    }
    Ok(())
}

fn pinned_revision(rev: Option<&str>, repo: &str, section: &str) -> Result<String, String> {
    match rev.map(str::trim) {
        None | Some("") => Err(format!(
            "required for hub repo {repo}: pin a commit sha (or tag) so that runs are reproducible, e.g. {section}.revision = \"<40-hex commit>\""
        )),
        Some(r @ ("main" | "master")) => Err(format!(
            "'{r}' is a moving branch; pin a commit sha (or tag) of {repo}"
        )),
        Some(r) => Ok(r.to_string()),
    }
}

/// Check a whole raw file; `Some` when every section could be built (semantic problems
/// may still have been recorded in `probs`).
pub fn check(mut raw: Table, probs: &mut Problems) -> Option<PipelineConfig> {
    let synthetic = raw.contains_key("synthetic");
    if synthetic {
        fill_synthetic_defaults(&mut raw);
    }
    for key in raw.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            probs.add(
                key.clone(),
                format!("unknown section{}", suggest(key, &SECTIONS)),
            );
        }
    }
    for s in REQUIRED {
        if !raw.contains_key(s) {
            probs.add(s, format!("required section [{s}] is missing"));
        }
    }
    precheck_hookpoints(&mut raw, probs);
    let has_jsae = raw.contains_key("jsae");
    let mut take = |name: &str| {
        raw.remove(name)
            .unwrap_or_else(|| Value::Table(Table::new()))
    };
    let section_value = |name: &str, v: Value, probs: &mut Problems| -> Option<Value> {
        match v {
            Value::Table(_) => Some(v),
            other => {
                probs.add(
                    name,
                    format!("must be a table ([{name}]), not a {}", other.type_str()),
                );
                None
            }
        }
    };
    macro_rules! sec {
        ($name:literal, $t:ty) => {{
            let v = take($name);
            let present =
                REQUIRED.contains(&$name) && !probs.has($name) || !REQUIRED.contains(&$name);
            section_value($name, v, probs)
                .filter(|_| present)
                .and_then(|v| parse::section::<$t>($name, v, probs))
        }};
    }
    let run = sec!("run", RunConfig);
    let model = sec!("model", ModelConfig);
    let data = sec!("data", DataConfig);
    let capture = sec!("capture", CaptureConfig);
    let train = sec!("train", TrainSection);
    let sae = sec!("sae", SaeConfig);
    let eval = sec!("eval", EvalConfig);
    let sweep = sec!("sweep", Table);
    let syn = if synthetic {
        sec!("synthetic", crate::synthetic::SyntheticSection).map(Some)
    } else {
        Some(None)
    };
    if let Some(Some(s)) = &syn {
        for (key, msg) in s.problems() {
            probs.add(key, msg);
        }
    }
    let jsae = if has_jsae {
        sec!("jsae", JsaeConfig).map(Some)
    } else {
        Some(None)
    };

    if let Some(r) = &run {
        check_run(r, probs);
    }
    if let Some(m) = model.as_ref().filter(|_| !synthetic) {
        if let Err((key, msg)) = model_source(m) {
            probs.add(key, msg);
        }
    }
    if let Some(m) = &model {
        check_model_compute(m, probs);
    }
    match &data {
        Some(d) if synthetic => positive(probs, "data.n_tokens", d.n_tokens),
        Some(d) => check_data(d, probs),
        None => {}
    }
    if let Some(c) = &capture {
        check_capture(c, probs);
    }
    if let Some(t) = &train {
        check_train(t, probs);
    }
    if let Some(s) = &sae {
        check_sae(s, probs);
    }
    if let Some(e) = &eval {
        positive_opt(probs, "eval.eval_tokens", e.eval_tokens);
        positive_opt(probs, "eval.dead_window_tokens", e.dead_window_tokens);
        positive_opt(probs, "eval.power_min_cell_tokens", e.power_min_cell_tokens);
    }
    if let Some(s) = &sweep {
        check_sweep(s, probs);
    }
    let config = PipelineConfig {
        run: run?,
        model: model?,
        data: data?,
        capture: capture?,
        train: train?,
        sae: sae?,
        eval: eval?,
        sweep: sweep?,
        synthetic: syn?,
        jsae: jsae?,
    };
    if let Some(j) = &config.jsae {
        for site in [crate::models::Site::MlpIn, crate::models::Site::MlpOut] {
            let hp = Hookpoint::new(j.layer, site);
            if !config.capture.hookpoints.contains(&hp) {
                probs.add(
                    "jsae.layer",
                    format!(
                        "[jsae] layer = {} needs \"{hp}\" in capture.hookpoints; add it",
                        j.layer
                    ),
                );
            }
        }
        if j.k == 0 {
            probs.add("jsae.k", "must be at least 1");
        }
        if let Some(f) = j.d_sae.filter(|&f| j.k > f) {
            probs.add(
                "jsae.k",
                format!(
                    "{} is more than jsae.d_sae = {f} latents; lower it to at most {f}",
                    j.k
                ),
            );
        }
        if j.d_sae == Some(0) || (j.d_sae.is_none() && j.expansion_factor == 0) {
            probs.add(
                if j.d_sae.is_some() {
                    "jsae.d_sae"
                } else {
                    "jsae.expansion_factor"
                },
                "must be > 0",
            );
        }
        if let Some(l) = j.lambda.filter(|l| !(l.is_finite() && *l >= 0.0)) {
            probs.add("jsae.lambda", format!("{l} must be a finite number >= 0"));
        }
        if !(j.lr.is_finite() && j.lr > 0.0) {
            probs.add("jsae.lr", format!("{} must be a finite number > 0", j.lr));
        }
    }
    // Cross-section rules.
    if let Some(e) = config.eval.eval_tokens {
        if e > config.data.eval_tokens {
            probs.add(
                "eval.eval_tokens",
                format!(
                    "{e} is more than the {} held-out tokens captured (data.eval_tokens)",
                    config.data.eval_tokens
                ),
            );
        }
    }
    if matches!(config.train.optimizer, OptimizerConfig::PamSgd { .. })
        && !config.sae.arch.supports_pam_sgd()
    {
        probs.add(
            "train.optimizer.kind",
            format!(
                "\"pam_sgd\" supports sae.arch kinds {}, not `{}`; use kind = \"adam\" for this SAE",
                crate::sae::ArchConfig::pam_sgd_kinds().join(", "),
                config.sae.arch.kind()
            ),
        );
    }
    check_train_backend(&config, probs);
    check_cpu_optimizers(&config, probs);
    let train_tokens = config.train.train_tokens.unwrap_or(config.data.n_tokens);
    check_streaming(&config, train_tokens, probs);
    if train_tokens < config.train.batch_tokens as u64 {
        probs.add(
            "train.batch_tokens",
            format!(
                "{} is more than the {train_tokens} training tokens",
                config.train.batch_tokens
            ),
        );
    }
    Some(config)
}

/// `capture.keep = false` (streaming with bounded disk): a budget, one pass over the
/// data, no stage that reads the whole training split. The budget's exact minimum needs
/// d_model and is checked once the model is loaded (pipeline::stream); this bound holds at
/// any d_model.
fn check_streaming(config: &PipelineConfig, train_tokens: u64, probs: &mut Problems) {
    let c = &config.capture;
    if c.keep {
        if c.disk_budget_bytes.is_some() {
            probs.add(
                "capture.disk_budget_bytes",
                "applies only to a streamed run; set capture.keep = false too, or remove it",
            );
        }
        return;
    }
    if config.synthetic.is_some() {
        probs.add(
            "capture.keep",
            "= false streams captured activations; a [synthetic] pipeline captures nothing, remove the key",
        );
        return;
    }
    if config.jsae.is_some() {
        probs.add(
            "capture.keep",
            "= false cannot be used with [jsae]: the JSAE stage reads the whole training split; set capture.keep = true or remove [jsae]",
        );
    }
    let d = &config.data;
    if train_tokens > d.n_tokens {
        probs.add(
            "train.train_tokens",
            format!(
                "{train_tokens} is more than data.n_tokens = {}: a streamed run (capture.keep = false) passes over the captured tokens once; lower train.train_tokens or raise data.n_tokens",
                d.n_tokens
            ),
        );
    }
    let shard_rows = (c.shard_tokens / d.context_len.max(1) as u64).max(1) * d.context_len as u64;
    let rows = d.eval_tokens + 2 * shard_rows.min(d.n_tokens);
    let floor = rows * (16 + c.dtype.size() as u64) * c.hookpoints.len().max(1) as u64;
    match c.disk_budget_bytes {
        None => probs.add(
            "capture.disk_budget_bytes",
            "is required when capture.keep = false: the bytes the activations folder may hold (held-out split + one chunk of shards), e.g. 10737418240 for 10 GiB",
        ),
        Some(b) if b < floor => probs.add(
            "capture.disk_budget_bytes",
            format!(
                "{b} bytes cannot hold the held-out split ({} tokens) plus two shards of {shard_rows} tokens of {} hookpoint(s): that needs more than {floor} bytes even at d_model 1; raise it (or lower data.eval_tokens / capture.shard_tokens)",
                d.eval_tokens,
                c.hookpoints.len()
            ),
        ),
        Some(_) => {}
    }
}

/// A `[synthetic]` pipeline needs no model, text or hookpoints: fill in what the other
/// sections would require (`model.source = "synthetic"`, `data.files = []`,
/// `data.context_len = 1`, one stand-in hookpoint), keeping anything the file sets.
fn fill_synthetic_defaults(raw: &mut Table) {
    let mut defaults = |section: &str, entries: Vec<(&str, Value)>| {
        if let Value::Table(t) = raw
            .entry(section)
            .or_insert_with(|| Value::Table(Table::new()))
        {
            for (k, v) in entries {
                t.entry(k).or_insert(v);
            }
        }
    };
    defaults("model", vec![("source", Value::from(SYNTHETIC_MODEL))]);
    defaults(
        "data",
        vec![
            ("files", Value::Array(vec![])),
            ("context_len", Value::from(1)),
        ],
    );
    defaults(
        "capture",
        vec![(
            "hookpoints",
            Value::Array(vec![Value::from(SYNTHETIC_HOOKPOINT)]),
        )],
    );
}

/// Parse each hookpoint name, report each bad one with its index, and drop them so the
/// typed parse of `[capture]` sees only good names.
fn precheck_hookpoints(raw: &mut Table, probs: &mut Problems) {
    let Some(Value::Array(items)) = raw
        .get_mut("capture")
        .and_then(|c| c.as_table_mut())
        .and_then(|c| c.get_mut("hookpoints"))
    else {
        return;
    };
    let mut seen = BTreeSet::new();
    let mut keep = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("capture.hookpoints[{i}]");
        match item.as_str().map(str::parse::<Hookpoint>) {
            None => probs.add(key, format!("must be a string, not a {}", item.type_str())),
            Some(Err(e)) => probs.add(key, e.to_string()),
            Some(Ok(hp)) => {
                if !seen.insert(hp) {
                    probs.add(key, format!("{hp} is listed twice"));
                }
                keep.push(item.clone());
            }
        }
    }
    *items = keep;
}

fn positive(probs: &mut Problems, key: &str, v: u64) {
    if v == 0 {
        probs.add(key, "must be > 0");
    }
}

fn positive_opt(probs: &mut Problems, key: &str, v: Option<u64>) {
    if let Some(v) = v {
        positive(probs, key, v);
    }
}

/// `model.device`: a CUDA device in a binary built without the `cuda` feature is refused
/// here, with the fix, before anything is downloaded. Whether the GPU is present is
/// checked when the pipeline opens the device (`crate::models::DeviceSpec::open`), so a
/// login node without a GPU can still validate and submit. Every `model.dtype` value is
/// implemented.
fn check_model_compute(m: &ModelConfig, probs: &mut Problems) {
    if let Err(e) = m.device.check_build("model.device") {
        let msg = e.to_string();
        let msg = msg
            .strip_prefix(&format!("model.device = \"{}\": ", m.device))
            .map(|rest| format!("\"{}\": {rest}", m.device))
            .unwrap_or(msg);
        probs.add("model.device", msg);
    }
}

fn check_run(r: &RunConfig, probs: &mut Problems) {
    if let Err(msg) = crate::store::remote::parse_url(&r.data_dir.to_string_lossy()) {
        probs.add("run.data_dir", msg);
    }
    let ok = !r.name.is_empty()
        && r.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !r.name.starts_with('.');
    if !ok {
        probs.add(
            "run.name",
            format!(
                "'{}' cannot name a folder; use letters, digits, '-', '_' and '.'",
                r.name
            ),
        );
    }
}

fn check_data(d: &DataConfig, probs: &mut Problems) {
    match (&d.repo, &d.revision) {
        (Some(repo), rev) => {
            if let Err(e) = check_repo_id(repo) {
                probs.add(
                    "data.repo",
                    format!("{e}; expected a hub dataset repo id \"org/name\""),
                );
            } else if let Err(e) = pinned_revision(rev.as_deref(), repo, "data") {
                probs.add("data.revision", e);
            }
        }
        (None, Some(_)) => probs.add(
            "data.revision",
            "only used with a hub dataset (data.repo); local files have no revision",
        ),
        (None, None) => {}
    }
    if d.files.is_empty() {
        probs.add("data.files", "must list at least one file or glob");
    }
    for (i, f) in d.files.iter().enumerate() {
        let key = format!("data.files[{i}]");
        if f.trim().is_empty() {
            probs.add(key, "empty file name");
            continue;
        }
        if let Err(e) = glob::Pattern::new(f) {
            probs.add(key, format!("'{f}' is not a valid glob: {e}"));
            continue;
        }
        let ext = f.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        let wild = ext.contains(['*', '?', '[']);
        if !wild && !DATA_EXTENSIONS.contains(&ext) {
            probs.add(
                key,
                format!("'{f}': text is read from .txt, .jsonl or .parquet files"),
            );
        }
    }
    if d.text_column.is_empty() {
        probs.add("data.text_column", "must not be empty");
    }
    let min_len = if d.prepend_bos { 2 } else { 1 };
    if d.context_len < min_len {
        probs.add(
            "data.context_len",
            format!(
                "must be >= {min_len} (tokens per window{})",
                if d.prepend_bos { ", BOS included" } else { "" }
            ),
        );
    }
    positive(probs, "data.n_tokens", d.n_tokens);
    if !(0.0..1.0).contains(&d.eval_fraction) {
        probs.add("data.eval_fraction", "must be in [0, 1)");
    } else if d.eval_tokens > 0 && d.eval_fraction == 0.0 {
        probs.add(
            "data.eval_fraction",
            "is 0, so no document is held out for the data.eval_tokens; set it > 0 (e.g. 0.1) or eval_tokens = 0",
        );
    }
}

fn check_capture(c: &CaptureConfig, probs: &mut Problems) {
    if c.hookpoints.is_empty()
        && !probs
            .0
            .iter()
            .any(|p| p.key.starts_with("capture.hookpoints"))
    {
        probs.add(
            "capture.hookpoints",
            "must list at least one hookpoint, e.g. \"blocks.3.hook_mlp_out\"",
        );
    }
    positive(probs, "capture.batch_size", c.batch_size as u64);
    positive(probs, "capture.row_group_rows", c.row_group_rows as u64);
    positive(probs, "capture.shard_tokens", c.shard_tokens);
}

fn check_train(t: &TrainSection, probs: &mut Problems) {
    let (lr, beta1, beta2, eps) = t.optimizer.adam();
    let (lr, beta1, beta2, eps) = (&lr, &beta1, &beta2, &eps);
    if let OptimizerConfig::PamSgd { .. } = &t.optimizer {
        let cfg = PipelineConfig::pam_config(&t.optimizer);
        for p in cfg.map(|c| c.problems()).unwrap_or_default() {
            let (key, msg) = p.split_once(' ').unwrap_or((&p, ""));
            probs.add(key.to_string(), msg.to_string());
        }
    }
    if let Some(lr) = lr {
        if !(lr.is_finite() && *lr > 0.0) {
            probs.add(
                "train.optimizer.lr",
                format!("{lr} must be a finite number > 0"),
            );
        }
    }
    for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
        if let Some(b) = b {
            if !(0.0..1.0).contains(b) {
                probs.add(
                    format!("train.optimizer.{name}"),
                    format!("{b} must be in [0, 1)"),
                );
            }
        }
    }
    if !(eps.is_finite() && *eps > 0.0) {
        probs.add(
            "train.optimizer.eps",
            format!("{eps} must be a finite number > 0"),
        );
    }
    positive(probs, "train.batch_tokens", t.batch_tokens as u64);
    positive_opt(probs, "train.train_tokens", t.train_tokens);
    positive_opt(probs, "train.lr_decay_steps", t.lr_decay_steps);
    positive_opt(probs, "train.checkpoint_every", t.checkpoint_every);
    positive(probs, "train.dead_after_tokens", t.dead_after_tokens);
    positive(probs, "train.init_tokens", t.init_tokens as u64);
    positive(probs, "train.log_every", t.log_every);
    if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
        probs.add(
            "train.grad_clip",
            format!(
                "{} must be a finite number >= 0 (0 = no clipping)",
                t.grad_clip
            ),
        );
    }
}

/// `train.optimizer.kind = "signum"` or `"muon"`: their settings, and the CPU kernels only.
fn check_cpu_optimizers(config: &PipelineConfig, probs: &mut Problems) {
    let o = &config.train.optimizer;
    let problems = match *o {
        OptimizerConfig::Signum {
            momentum,
            warmup_steps,
            ..
        } => crate::train::schedule_free::SignumConfig {
            momentum,
            warmup_steps,
        }
        .problems(),
        OptimizerConfig::Muon { .. } => o.muon().map(|c| c.problems()).unwrap_or_default(),
        _ => return,
    };
    for p in problems {
        let (key, msg) = p.split_once(' ').unwrap_or((&p, ""));
        probs.add(key.to_string(), msg.to_string());
    }
    if config.train.backend(&config.model) == TrainBackend::Tensor {
        let msg = crate::train::config::cpu_only_optimizer(o.kind());
        let msg = msg.strip_prefix("train.optimizer.kind = ").unwrap_or(&msg);
        probs.add("train.optimizer.kind", msg.to_string());
    }
}

/// `train.device` and `train.backend` against each other, the build and the variant.
fn check_train_backend(config: &PipelineConfig, probs: &mut Problems) {
    let t = &config.train;
    let device = t.device(&config.model);
    let backend = t.backend(&config.model);
    // A CUDA `model.device` in a CPU build is reported under its own key (check_model_compute);
    // here only an explicit `train.device`.
    if t.device.is_some() && matches!(device, DeviceKind::Cuda(_)) && !cfg!(feature = "cuda") {
        probs.add(
            "train.device",
            "\"cuda\": this saepipe was built without CUDA; rebuild with `cargo build --release --features cuda`, or set train.device = \"cpu\"",
        );
    }
    if t.compute_dtype != crate::train::ComputeDtype::F32 && backend == TrainBackend::Kernels {
        probs.add(
            "train.compute_dtype",
            format!(
                "\"{}\" needs train.backend = \"tensor\" (the CPU kernels compute in f32 only); set train.backend = \"tensor\" or remove compute_dtype",
                t.compute_dtype.name()
            ),
        );
    }
    if matches!(device, DeviceKind::Cuda(_)) && backend == TrainBackend::Kernels {
        probs.add(
            "train.backend",
            "\"kernels\" runs on the CPU only; use backend = \"tensor\" (the default on cuda) or train.device = \"cpu\"",
        );
    }
    if backend == TrainBackend::Tensor && !config.sae.arch.supports_tensor() {
        let key = if t.backend.is_some() {
            "train.backend"
        } else {
            "train.device"
        };
        probs.add(
            key,
            format!(
                "train.device = \"{}\" trains on the tensor backend, which implements sae.arch kinds {}, not `{}`; use train.device = \"cpu\" (the CPU kernels) for this SAE",
                device,
                crate::sae::ArchConfig::tensor_kinds().join(", "),
                config.sae.arch.kind()
            ),
        );
    }
}

fn check_sae(s: &SaeConfig, probs: &mut Problems) {
    match (s.expansion_factor, s.d_sae) {
        (Some(_), Some(_)) => probs.add("sae", "set expansion_factor or d_sae, not both"),
        (None, None) => probs.add(
            "sae",
            "set expansion_factor (latents per input dimension) or d_sae",
        ),
        (Some(0), _) => probs.add("sae.expansion_factor", "must be > 0"),
        (_, Some(0)) => probs.add("sae.d_sae", "must be > 0"),
        _ => {}
    }
    // The variant's own hyperparameter checks (what building the SAE would refuse after
    // capture); against d_sae only when it is explicit (d_in is not known yet).
    for (field, msg) in s.arch.problems(s.d_sae.filter(|&f| f > 0)) {
        probs.add(format!("sae.arch.{field}"), msg);
    }
}

fn check_sweep(s: &Table, probs: &mut Problems) {
    for (key, v) in s {
        let k = format!("sweep.\"{key}\"");
        match v {
            Value::Array(a) if a.is_empty() => probs.add(k, "needs at least one value"),
            Value::Array(_) => {}
            other => probs.add(
                k,
                format!("must be an array of values, not a {}", other.type_str()),
            ),
        }
        if key == super::sweep::ROOT_AXIS {
            for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                match item.as_table() {
                    Some(t) => {
                        for sec in t.keys() {
                            if !SECTIONS.contains(&sec.as_str()) || sec == "sweep" {
                                probs.add(
                                    format!("sweep.\"{key}\"[{i}].{sec}"),
                                    format!("is not a section that can be swept{}", suggest(sec, &SECTIONS)),
                                );
                            }
                        }
                    }
                    None => probs.add(
                        format!("sweep.\"{key}\"[{i}]"),
                        format!("must be a table of sections, e.g. {{ sae = {{ arch = {{ kind = \"kmeans\" }} }} }}, not a {}", item.type_str()),
                    ),
                }
            }
            continue;
        }
        match super::overrides::parse_key(key) {
            Ok(path) if path.first().map(String::as_str) == Some("sweep") => {
                probs.add(join("sweep", key), "cannot sweep the sweep table")
            }
            Ok(path) if !SECTIONS.contains(&path[0].as_str()) => probs.add(
                format!("sweep.\"{key}\""),
                format!(
                    "'{}' is not a section{}",
                    path[0],
                    suggest(&path[0], &SECTIONS)
                ),
            ),
            Ok(_) => {}
            Err(e) => probs.add(format!("sweep.\"{key}\""), e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(source: &str, revision: Option<&str>) -> ModelConfig {
        ModelConfig {
            source: source.into(),
            revision: revision.map(Into::into),
            dtype: Dtype::F32,
            device: DeviceKind::Cpu,
            random_init: false,
            random_init_seed: 0,
        }
    }

    #[test]
    fn model_sources_parse_or_name_the_key() {
        assert_eq!(
            model_source(&m("local:models/tiny", None)),
            Ok(ModelSource::Local {
                dir: "models/tiny".into()
            })
        );
        assert_eq!(
            model_source(&m("gguf:a/b.gguf", None)),
            Ok(ModelSource::Gguf {
                file: "a/b.gguf".into()
            })
        );
        assert_eq!(
            model_source(&m("EleutherAI/pythia-70m", Some("abc123"))),
            Ok(ModelSource::Hub {
                repo: "EleutherAI/pythia-70m".into(),
                revision: Some("abc123".into())
            })
        );
        assert_eq!(
            model_source(&m("org/name", None)).unwrap_err().0,
            "model.revision"
        );
        assert!(model_source(&m("org/name", Some("main")))
            .unwrap_err()
            .1
            .contains("moving branch"));
        assert_eq!(
            model_source(&m("a/b/c", Some("x"))).unwrap_err().0,
            "model.source"
        );
        assert_eq!(
            model_source(&m("local:", None)).unwrap_err().0,
            "model.source"
        );
    }

    #[test]
    fn cuda_in_a_cpu_build_is_refused_with_the_other_problems() {
        let text = r#"
[run]
name = "x"
[model]
source = "local:models/tiny"
dtype = "bf16"
device = "cuda:1"
[data]
files = ["corpus.txt"]
context_len = 0
n_tokens = 1000
[capture]
hookpoints = ["blocks.0.hook_resid_post"]
[sae]
expansion_factor = 2
arch = { kind = "topk", k = 4 }
"#;
        let err = super::super::from_str(text, std::path::Path::new("p.toml"), &[]).unwrap_err();
        let super::super::ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}");
        };
        let msg = |key: &str| {
            problems
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.message.clone())
        };
        assert_eq!(msg("model.dtype"), None, "bf16 is implemented");
        if cfg!(feature = "cuda") {
            assert_eq!(msg("model.device"), None);
        } else {
            let m = msg("model.device").expect("model.device is reported");
            assert!(m.contains(r#""cuda:1""#), "{m}");
            assert!(m.contains("--features cuda"), "{m}");
            assert!(m.contains(r#"model.device = "cpu""#), "{m}");
        }
        // reported together with the file's other problems
        assert!(msg("data.context_len").is_some());
        let sets = [
            r#"model.device="cpu""#.to_string(),
            "data.context_len=8".to_string(),
            "data.n_tokens=10000".to_string(),
        ];
        let p = super::super::from_str(text, std::path::Path::new("p.toml"), &sets).unwrap();
        assert_eq!(p.config.model.device, DeviceKind::Cpu);
        assert_eq!(p.config.model.dtype, Dtype::Bf16);
        let bad = [r#"model.device="gpu""#.to_string()];
        let err = super::super::from_str(text, std::path::Path::new("p.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.device"), "{err}");
        assert!(err.contains("cuda:N"), "{err}");
    }
}
