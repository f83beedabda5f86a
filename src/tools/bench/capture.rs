//! `saepipe bench capture`: tokens/s, peak RSS and bytes per token of a capture.
//!
//! Each (model dtype, stored dtype, budget) case runs in a fresh child process (`saepipe bench capture
//! --one …`), because peak RSS (`VmHWM`) only ever grows within a process: separate
//! processes are what shows that peak memory does not grow with the token budget.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use clap::Parser;

use super::BenchError;
use crate::capture::{capture, CaptureSpec};
use crate::data::{DocSplit, PackSpec, TextSource};
use crate::models::{DeviceSpec, HookedModel, Hookpoint, ModelSource};
use crate::store::{ActDtype, WriterSettings};
use crate::util::progress::Silent;

/// Arguments of `saepipe bench capture`.
#[derive(Debug, Clone, Parser)]
#[command(name = "saepipe bench capture")]
pub struct BenchCaptureArgs {
    /// Model source: local:<dir> or gguf:<file>.
    #[arg(
        long,
        default_value = "gguf:data/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub model: String,
    /// Hookpoint (default: mlp_out of the middle block).
    #[arg(long)]
    pub hookpoint: Option<String>,
    /// Text files or globs.
    #[arg(long, default_value = "data/corpus/pydoc_topics.jsonl")]
    pub corpus: Vec<String>,
    /// Token budgets, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2000,20000")]
    pub tokens: Vec<u64>,
    /// Stored dtypes, comma-separated (f32, f16, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16")]
    pub dtype: Vec<String>,
    /// Model (weight and compute) dtypes, comma-separated (f32, bf16, f16): what
    /// `[model] dtype` sets in a pipeline.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub model_dtype: Vec<String>,
    /// Where the model runs: cpu, cuda or cuda:N (default: the first GPU when built with
    /// `--features cuda` and one is present, else the CPU).
    #[arg(long)]
    pub device: Option<String>,
    /// Context length.
    #[arg(long, default_value_t = 128)]
    pub context_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Where to write (a temp folder by default; deleted afterwards).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run exactly one case in this process (used by the parent).
    #[arg(long, hide = true)]
    pub one: bool,
}

/// One measured case.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CaseResult {
    /// Token budget.
    pub tokens: u64,
    /// Model dtype.
    #[serde(default)]
    pub model_dtype: String,
    /// Stored dtype.
    pub dtype: String,
    /// Seconds of the capture (model load excluded).
    pub seconds: f64,
    /// Peak RSS of the process in bytes (model load included).
    pub peak_rss: u64,
    /// Bytes on disk of the shards.
    pub bytes: u64,
}

fn parse_model_dtype_arg(s: &str) -> anyhow::Result<DType> {
    crate::models::parse_model_dtype(s)
        .ok_or_else(|| anyhow::anyhow!("unknown --model-dtype '{s}'; use f32, bf16 or f16"))
}

fn parse_dtype(s: &str) -> anyhow::Result<ActDtype> {
    match s {
        "f32" | "float32" => Ok(ActDtype::F32),
        "f16" | "float16" => Ok(ActDtype::F16),
        "bf16" | "bfloat16" => Ok(ActDtype::Bf16),
        other => anyhow::bail!("unknown dtype '{other}'; use f32, f16 or bf16"),
    }
}

/// Run one case in this process with an already loaded model.
pub fn run_case(
    model: &dyn HookedModel,
    tokenizer: Arc<tokenizers::Tokenizer>,
    args: &BenchCaptureArgs,
    out: &Path,
    tokens: u64,
    dtype: ActDtype,
) -> anyhow::Result<CaseResult> {
    let hp: Hookpoint = match &args.hookpoint {
        Some(h) => h.parse()?,
        None => Hookpoint::new(model.info().n_layers / 2, crate::models::Site::MlpOut),
    };
    let spec = CaptureSpec {
        out_dir: out.to_path_buf(),
        model_repo: args.model.clone(),
        model_revision: "bench".into(),
        hookpoints: vec![hp],
        source: TextSource::new(args.corpus.clone()),
        pack: PackSpec::new(args.context_len),
        split: DocSplit {
            seed: 0,
            eval_fraction: 0.0,
        },
        n_tokens: tokens,
        n_eval_tokens: 0,
        batch_size: args.batch_size,
        shard_windows: 64,
        dtype,
        writer: WriterSettings::default(),
        exclude_special_tokens: true,
        force: true,
    };
    let t = Instant::now();
    let sums = capture(model, tokenizer, &spec, &Silent)?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(CaseResult {
        tokens,
        model_dtype: model.dtype().as_str().into(),
        dtype: dtype.name().into(),
        seconds,
        peak_rss: super::peak_rss_bytes().unwrap_or(0),
        bytes: sums.iter().map(|s| s.bytes).sum(),
    })
}

/// Print the table header and one row per case.
pub fn render(results: &[CaseResult]) -> String {
    let mut s = format!(
        "{:>10} {:>6} {:>8} {:>10} {:>12} {:>12} {:>12}\n",
        "tokens", "model", "dtype", "seconds", "tokens/s", "peak RSS", "bytes/token"
    );
    for r in results {
        s.push_str(&format!(
            "{:>10} {:>6} {:>8} {:>10.2} {:>12.0} {:>12} {:>12.1}\n",
            r.tokens,
            r.model_dtype,
            r.dtype,
            r.seconds,
            r.tokens as f64 / r.seconds.max(1e-9),
            crate::store::human_bytes(r.peak_rss),
            r.bytes as f64 / r.tokens.max(1) as f64
        ));
    }
    s
}

/// Load a model and its tokenizer from a source string (`local:<dir>`, `gguf:<file>`) in
/// `dtype` on `device` (`cpu`, `cuda`, `cuda:N`; `None`: the default device).
pub fn load_model(
    source: &str,
    dtype: DType,
    device: Option<&str>,
) -> Result<(Box<dyn HookedModel>, Arc<tokenizers::Tokenizer>), BenchError> {
    let src: ModelSource = source.parse()?;
    let device = match device {
        Some(d) => DeviceSpec::parse_for("--device", d)
            .and_then(|d| d.open("--device"))
            .map_err(|e| BenchError::Capture(e.to_string()))?,
        None => crate::models::default_device(),
    };
    let loaded = crate::models::load_source_with(&src, &device, dtype, None)?;
    let tok = loaded.tokenizer.ok_or_else(|| {
        BenchError::Capture(format!("{source}: no tokenizer found next to the model"))
    })?;
    Ok((loaded.model, Arc::new(tok)))
}

/// `saepipe bench capture [args]`: the parent spawns one child per case and prints the
/// table; a child (`--one`) loads the model, runs its case and prints one JSON line.
pub fn run_cli(raw: &[String]) -> Result<(), BenchError> {
    let argv = std::iter::once("saepipe bench capture".to_string()).chain(raw.iter().cloned());
    let args =
        BenchCaptureArgs::try_parse_from(argv).map_err(|e| BenchError::Usage(e.to_string()))?;
    let err = |e: &dyn std::fmt::Display| BenchError::Capture(e.to_string());
    let out = match &args.out {
        Some(o) => o.clone(),
        None => std::env::temp_dir().join(format!("saepipe-bench-capture-{}", std::process::id())),
    };
    if args.one {
        let model_dtype = parse_model_dtype_arg(&args.model_dtype[0]).map_err(|e| err(&e))?;
        let (model, tok) = load_model(&args.model, model_dtype, args.device.as_deref())?;
        let dtype = parse_dtype(&args.dtype[0]).map_err(|e| err(&e))?;
        let r = run_case(model.as_ref(), tok, &args, &out, args.tokens[0], dtype)
            .map_err(|e| err(&e))?;
        println!("{}", serde_json::to_string(&r).map_err(|e| err(&e))?);
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|e| err(&e))?;
    let mut results = Vec::new();
    for md in &args.model_dtype {
        parse_model_dtype_arg(md).map_err(|e| err(&e))?;
    }
    for dt in &args.dtype {
        parse_dtype(dt).map_err(|e| err(&e))?;
    }
    let mut cases = Vec::new();
    for md in &args.model_dtype {
        for dt in &args.dtype {
            for &n in &args.tokens {
                cases.push((md, dt, n));
            }
        }
    }
    for (md, dt, n) in cases {
        let case_out = out.join(format!("{md}-{dt}-{n}"));
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["-q", "bench", "capture", "--one", "--model", &args.model])
            .args(["--tokens", &n.to_string(), "--dtype", dt])
            .args(["--model-dtype", md])
            .args(["--context-len", &args.context_len.to_string()])
            .args(["--batch-size", &args.batch_size.to_string()])
            .arg("--out")
            .arg(&case_out);
        for c in &args.corpus {
            cmd.args(["--corpus", c]);
        }
        if let Some(h) = &args.hookpoint {
            cmd.args(["--hookpoint", h]);
        }
        if let Some(d) = &args.device {
            cmd.args(["--device", d]);
        }
        let o = cmd.output().map_err(|e| err(&e))?;
        if !o.status.success() {
            return Err(BenchError::Capture(format!(
                "case {md}/{dt}/{n} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            )));
        }
        let stdout = String::from_utf8_lossy(&o.stdout);
        let line = stdout.lines().last().unwrap_or("");
        let r: CaseResult = serde_json::from_str(line.trim()).map_err(|e| err(&e))?;
        let _ = std::fs::remove_dir_all(&case_out);
        results.push(r);
    }
    if args.out.is_none() {
        let _ = std::fs::remove_dir_all(&out);
    }
    print!("{}", render(&results));
    Ok(())
}
