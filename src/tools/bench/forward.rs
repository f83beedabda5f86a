//! `saepipe bench forward`: forward-pass throughput of our candle models, full depth and
//! stopped at a middle layer, peak RSS, and optionally the same shape through the PyTorch
//! reference (`benches/reference/forward_tps.py`).
//!
//! ```text
//! saepipe bench forward --model gguf:data/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --batch 4 --seq 128 [--stop-layer 14] [--iters 5] [--reference-python .venv-ref/bin/python]
//! ```
//!
//! Decision: token ids are drawn uniformly from the vocabulary with a fixed seed (the cost
//! of a dense forward does not depend on them); one warm-up pass precedes the timed passes.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::Tensor;
use clap::Parser;
use rand::{Rng, SeedableRng};

use super::{peak_rss_bytes, BenchError};
use crate::models::{HookedModel, ModelSource, NoHooks};

/// Arguments of `saepipe bench forward`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "saepipe bench forward",
    about = "Forward-pass tokens/s and peak RSS"
)]
pub struct ForwardArgs {
    /// The model: local:<dir> or gguf:<file>.
    #[arg(long)]
    pub model: String,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// The block to stop after for the partial-depth row (default: the middle block,
    /// n_layers / 2).
    #[arg(long)]
    pub stop_layer: Option<usize>,
    /// Timed passes per row.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// A Python with torch + transformers; runs benches/reference/forward_tps.py with the
    /// same shape and adds its rows to the table.
    #[arg(long)]
    pub reference_python: Option<PathBuf>,
    /// The reference script.
    #[arg(long, default_value = "benches/reference/forward_tps.py")]
    pub reference_script: PathBuf,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Which implementation.
    pub implementation: String,
    /// "full (30 blocks)" or "blocks 0..=14".
    pub depth: String,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Milliseconds per forward pass.
    pub ms_per_pass: f64,
}

/// Parse `args` and run the benchmark, printing the table.
pub fn run_cli(args: &[String]) -> Result<(), BenchError> {
    let argv = std::iter::once("saepipe bench forward".to_string()).chain(args.iter().cloned());
    let a = ForwardArgs::try_parse_from(argv).map_err(|e| BenchError::Usage(e.to_string()))?;
    let rows = run(&a)?;
    print_table(&a, &rows);
    Ok(())
}

/// Time `iters` passes of `model` on `ids`, stopping after `stop` when given.
fn time_passes(
    model: &dyn HookedModel,
    ids: &Tensor,
    stop: Option<usize>,
    iters: usize,
) -> Result<f64, BenchError> {
    model.forward_hooked(ids, &mut NoHooks, stop)?; // warm-up
    let t0 = Instant::now();
    for _ in 0..iters {
        let out = model.forward_hooked(ids, &mut NoHooks, stop)?;
        // Make sure the work is done (matters on asynchronous devices).
        if let Some(l) = out {
            l.device().synchronize()?;
        }
    }
    Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Run the benchmark and return the rows (ours, then the reference's).
pub fn run(a: &ForwardArgs) -> Result<Vec<Row>, BenchError> {
    let source: ModelSource = a.model.parse()?;
    let device = crate::models::default_device();
    let t_load = Instant::now();
    let loaded = crate::models::load_source(&source, &device)?;
    tracing::info!("loaded {source} in {:.1}s", t_load.elapsed().as_secs_f64());
    let model = loaded.model.as_ref();
    let info = model.info().clone();
    let n_layers = info.n_layers;
    let stop = a.stop_layer.unwrap_or(n_layers / 2).min(n_layers - 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|_| rng.random_range(0..info.vocab_size as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), &device)?;
    let tokens = (a.batch * a.seq) as f64;
    let mut rows = Vec::new();
    for (depth, stop_after) in [
        (format!("full ({n_layers} blocks)"), None),
        (format!("blocks 0..={stop}"), Some(stop)),
    ] {
        let s = time_passes(model, &ids, stop_after, a.iters)?;
        rows.push(Row {
            implementation: "saepipe (candle)".into(),
            depth,
            tokens_per_s: tokens / s,
            ms_per_pass: s * 1e3,
        });
    }
    if let Some(py) = &a.reference_python {
        rows.extend(reference_rows(a, py, &source, stop, n_layers)?);
    }
    Ok(rows)
}

/// Run the Python reference once per depth, with the same shape and thread count. The
/// script (benches/reference/forward_tps.py) prints `transformers_tokens_per_s=<float> ...`
/// as its last line.
fn reference_rows(
    a: &ForwardArgs,
    py: &std::path::Path,
    source: &ModelSource,
    stop: usize,
    n_layers: usize,
) -> Result<Vec<Row>, BenchError> {
    let ModelSource::Gguf { file: gguf } = source else {
        return Err(BenchError::Reference {
            cmd: py.display().to_string(),
            detail: "the reference benchmark loads gguf: models only".into(),
        });
    };
    let mut rows = Vec::new();
    for (depth, stop_arg) in [
        (format!("full ({n_layers} blocks)"), None),
        (format!("blocks 0..={stop}"), Some(stop)),
    ] {
        let mut cmd = Command::new(py);
        cmd.arg(&a.reference_script)
            .arg("--gguf")
            .arg(gguf)
            .args(["--batch", &a.batch.to_string(), "--seq", &a.seq.to_string()])
            .args(["--repeats", &a.iters.to_string()])
            .args([
                "--threads",
                &candle_core::utils::get_num_threads().to_string(),
            ]);
        if let Some(s) = stop_arg {
            cmd.args(["--stop-layer", &s.to_string()]);
        }
        let shown = format!("{cmd:?}");
        let fail = |detail: String| BenchError::Reference {
            cmd: shown.clone(),
            detail,
        };
        let out = cmd.output().map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            return Err(fail(format!(
                "exit status {}: {}",
                out.status,
                tail.join(" | ")
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tps = stdout
            .lines()
            .rev()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("transformers_tokens_per_s="))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .ok_or_else(|| fail("no transformers_tokens_per_s=<float> in its output".into()))?;
        rows.push(Row {
            implementation: "transformers (torch)".into(),
            depth,
            tokens_per_s: tps,
            ms_per_pass: (a.batch * a.seq) as f64 / tps * 1e3,
        });
    }
    Ok(rows)
}

/// Print the table (Markdown, so it pastes into reports).
pub fn print_table(a: &ForwardArgs, rows: &[Row]) {
    println!(
        "forward: model={} batch={} seq={} iters={} threads={}",
        a.model,
        a.batch,
        a.seq,
        a.iters,
        candle_core::utils::get_num_threads()
    );
    println!("| implementation | depth | tokens/s | ms/pass |");
    println!("|---|---|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.1} |",
            r.implementation, r.depth, r.tokens_per_s, r.ms_per_pass
        );
    }
    match peak_rss_bytes() {
        Some(b) => println!(
            "peak RSS (saepipe): {:.0} MiB",
            b as f64 / (1024.0 * 1024.0)
        ),
        None => println!("peak RSS (saepipe): unavailable on this platform"),
    }
}
