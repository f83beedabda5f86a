//! `saepipe bench train`: SAE training throughput (tokens/s) and peak RSS per variant on
//! synthetic data, optionally next to the PyTorch reference
//! (`benches/reference/train_sae_torch.py`), in one table (sae_variants.md §8).
//!
//! Peak RSS is `VmHWM` from `/proc/self/status`, reset before each variant by writing `5` to
//! `/proc/self/clear_refs` (Linux ≥ 4.0), so each row is that variant's own peak.
//!
//! Decision: the variants without a torch reference (BatchTopK, AbsTopK, JumpReLU, Gated) are
//! compared with the torch ReLU+L1 SAE, the cheapest dense-autograd SAE at the same shapes
//! (TopK-family with TopK, the rest with ReLU+L1). AbsTopK (`--variants abs_topk`) is not in
//! the default list, which stays as it was.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

use crate::sae::registry::LONG_BUDGET_STEPS;
use crate::sae::{abs_topk, batchtopk, gated, jumprelu, relu_l1, topk, ArchConfig};
use crate::store::InMemorySource;
use crate::synthetic::{SyntheticConfig, SyntheticData};
use crate::train::{BDecInit, TrainConfig, TrainError, Trainer};
use crate::util::profile::{self, Phase};

/// Bench errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad arguments.
    #[error("{0}")]
    Args(String),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The reference script failed.
    #[error("reference run failed: {0}")]
    Reference(String),
}

/// Options of `saepipe bench train`.
#[derive(Debug, Parser)]
#[command(
    name = "saepipe bench train",
    about = "SAE training throughput per variant"
)]
pub struct BenchTrainArgs {
    /// Input width.
    #[arg(long, default_value_t = 2048)]
    pub d_in: usize,
    /// Dictionary width.
    #[arg(long, default_value_t = 16384)]
    pub d_sae: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// k for TopK and BatchTopK.
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    /// Timed steps per variant.
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Untimed warm-up steps per variant.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Variants to run (comma-separated kinds).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "topk,batchtopk,relu_l1,jumprelu,gated"
    )]
    pub variants: Vec<String>,
    /// Python interpreter with torch: also run the PyTorch reference and compare.
    #[arg(long)]
    pub reference_python: Option<PathBuf>,
    /// The reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference/train_sae_torch.py"))]
    pub reference_script: PathBuf,
    /// Shift every latent's bias (`b_enc`, or `b_gate` for Gated) before timing so the
    /// penalty variants start at this L0 instead of the ~d_sae/2 of a fresh init: the regime
    /// a trained SAE spends nearly all of its steps in. 0 = off (time from init).
    #[arg(long, default_value_t = 0.0)]
    pub start_l0: f64,
    /// Torch threads for the reference.
    #[arg(long, default_value_t = 2)]
    pub reference_threads: usize,
    /// Also time each phase of the timed steps (encoder GEMM, selection, sparse decode, the
    /// backward's dots, accumulations and rest, optimiser, the rest) and print them per
    /// variant in ms/step and % of the step.
    #[arg(long)]
    pub breakdown: bool,
}

/// Peak resident set size in MiB (`VmHWM`), if readable.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn arch_for(kind: &str, k: usize) -> Result<ArchConfig, BenchError> {
    Ok(match kind {
        "relu_l1" => ArchConfig::new(relu_l1::Config::default()),
        "topk" => ArchConfig::new(topk::Config {
            k,
            ..Default::default()
        }),
        "batchtopk" => ArchConfig::new(batchtopk::Config {
            k,
            ..Default::default()
        }),
        "abs_topk" => ArchConfig::new(abs_topk::Config {
            k,
            ..Default::default()
        }),
        "jumprelu" => ArchConfig::new(jumprelu::Config::default()),
        "gated" => ArchConfig::new(gated::Config::default()),
        other => {
            return Err(BenchError::Args(format!(
                "unknown variant `{other}` (relu_l1, topk, batchtopk, abs_topk, jumprelu, gated)"
            )))
        }
    })
}

fn reference(a: &BenchTrainArgs, py: &PathBuf, variant: &str) -> Result<f64, BenchError> {
    let out = std::process::Command::new(py)
        .arg(&a.reference_script)
        .args(["--variant", variant])
        .args([
            "--d-in",
            &a.d_in.to_string(),
            "--d-sae",
            &a.d_sae.to_string(),
        ])
        .args(["--batch", &a.batch.to_string(), "--k", &a.k.to_string()])
        .args([
            "--steps",
            &a.steps.to_string(),
            "--warmup",
            &a.warmup.to_string(),
        ])
        .args(["--threads", &a.reference_threads.to_string()])
        .output()
        .map_err(|e| BenchError::Reference(format!("{}: {e}", py.display())))?;
    if !out.status.success() {
        return Err(BenchError::Reference(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| BenchError::Reference(format!("no JSON line in output: {text}")))?;
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| BenchError::Reference(e.to_string()))?;
    v["tokens_per_s"]
        .as_f64()
        .ok_or_else(|| BenchError::Reference(format!("no tokens_per_s in {line}")))
}

/// Shift the per-latent bias uniformly (bisection) until the inference L0 on `x` is about `target`.
fn calibrate_l0(tr: &mut Trainer, x: &[f32], d: usize, target: f64) -> Result<(), BenchError> {
    let n = x.len() / d;
    let xs: Vec<f32> = x.iter().map(|v| v * tr.scale()).collect();
    let name = if tr.sae().params().iter().any(|p| p.name == "b_gate") {
        "b_gate"
    } else {
        "b_enc"
    };
    let base = tr
        .sae()
        .params()
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.data.clone())
        .ok_or_else(|| BenchError::Args(format!("no {name} to calibrate")))?;
    let mut ws = crate::sae::Workspace::default();
    let mut l0_at = |tr: &mut Trainer, shift: f32| -> Result<f64, BenchError> {
        if let Some(p) = tr
            .sae_mut()
            .params_mut()
            .iter_mut()
            .find(|p| p.name == name)
        {
            p.data
                .iter_mut()
                .zip(&base)
                .for_each(|(v, b)| *v = b - shift);
        }
        tr.sae().encode(&xs, n, &mut ws).map_err(TrainError::from)?;
        Ok(ws.codes.nnz() as f64 / n as f64)
    };
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    while l0_at(tr, hi)? > target && hi < 1e6 {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        if l0_at(tr, mid)? > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    l0_at(tr, hi)?;
    Ok(())
}

/// Seconds of the encoder GEMM alone at the bench's shape (`x [batch, d_in]` times
/// `W_enc [d_sae, d_in]`ᵀ plus the bias, [`crate::kernels::gemm_xwt`], which the CPU kernels'
/// encoders call, there chunk by chunk), over the whole batch in one call: the best of
/// `warmup + steps` (at least 3) repetitions after one untimed call. An SAE whose only dense
/// work is this GEMM trains at most at `batch / t` tokens/s.
fn gemm_ceiling(a: &BenchTrainArgs, data: &[f32]) -> f64 {
    let x = &data[..a.batch * a.d_in];
    let w: Vec<f32> = (0..a.d_sae * a.d_in)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let bias = vec![0.0f32; a.d_sae];
    let mut out = vec![0.0f32; a.batch * a.d_sae];
    crate::kernels::gemm_xwt(x, a.batch, a.d_in, &w, a.d_sae, Some(&bias), &mut out);
    let mut best = f64::INFINITY;
    for _ in 0..(a.steps + a.warmup).max(3) {
        let t0 = Instant::now();
        crate::kernels::gemm_xwt(x, a.batch, a.d_in, &w, a.d_sae, Some(&bias), &mut out);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}

/// The per-phase table of `--breakdown`: for each variant, every phase's ms/step and share of
/// the step, and what no timer covered (input copy and checks, firing bookkeeping).
/// One variant's row of the breakdown: its name, seconds per step, and each phase's total.
type PhaseRow = (String, f64, [(Phase, f64); 7]);

fn breakdown_table(rows: &[PhaseRow], steps: u64) -> String {
    let mut t = String::from("time per step by phase, ms (% of the step):\n");
    t += &format!("{:<10}", "variant");
    for p in Phase::ALL {
        t += &format!(" {:>16}", p.name());
    }
    t += &format!(" {:>16}\n", "other");
    for (kind, step, totals) in rows {
        t += &format!("{kind:<10}");
        let mut covered = 0.0;
        for (_, secs) in totals {
            let per = secs / steps as f64;
            covered += per;
            t += &format!(" {:>16}", share(per, *step));
        }
        t += &format!(" {:>16}\n", share((step - covered).max(0.0), *step));
    }
    t
}

fn share(secs: f64, step: f64) -> String {
    format!("{:.1} ({:.0}%)", secs * 1e3, 100.0 * secs / step.max(1e-12))
}

/// Run the benchmark with command-line `args` (after `bench train`); returns the table.
pub fn run(args: &[String]) -> Result<String, BenchError> {
    let a = BenchTrainArgs::try_parse_from(
        std::iter::once("bench-train".to_string()).chain(args.iter().cloned()),
    )
    .map_err(|e| BenchError::Args(e.to_string()))?;
    let mut table = format!(
        "SAE training throughput: d_in={} d_sae={} batch={} k={} steps={} (+{} warm-up), rayon threads={}, load avg at start {}\n",
        a.d_in,
        a.d_sae,
        a.batch,
        a.k,
        a.steps,
        a.warmup,
        rayon::current_num_threads(),
        loadavg()
    );
    let synth = SyntheticData::new(SyntheticConfig {
        d: a.d_in,
        n_features: 4 * a.d_in,
        mean_active: 32.0,
        noise: 0.01,
        bipolar: false,
        seed: 1,
    });
    let data = synth.sample(2 * a.batch, 7);
    let ceiling = gemm_ceiling(&a, &data);
    table += &format!(
        "one-GEMM ceiling: the encoder GEMM alone ([{}, {}] x [{}, {}]^T, kernels::gemm_xwt, the trainer's) takes {:.1} ms = {:.0} tokens/s ({:.0} GFLOP/s)\n",
        a.batch,
        a.d_in,
        a.d_sae,
        a.d_in,
        ceiling * 1e3,
        a.batch as f64 / ceiling,
        2.0 * (a.batch * a.d_in * a.d_sae) as f64 / ceiling / 1e9
    );
    let ceiling_tps = a.batch as f64 / ceiling;
    table += &format!(
        "{:<10} {:>8} {:>10} {:>12} {:>9} {:>10} {:>14} {:>9}\n",
        "variant", "L0", "ms/step", "tokens/s", "ceiling", "peakRSS", "torch tok/s", "speedup"
    );
    let mut ref_cache: Vec<(String, f64)> = Vec::new();
    let mut phases = Vec::new();
    for kind in &a.variants {
        let arch = arch_for(kind, a.k)?;
        // The schedule of a long run (the recipe's long-budget learning rate), and with
        // --start-l0 a long warm-up too, so the few timed steps keep the calibrated L0: a first
        // full-size Adam step would move every pre-activation and undo it. A step's cost does
        // not depend on the learning rate.
        let cfg = TrainConfig {
            batch_tokens: a.batch,
            total_tokens: 2 * LONG_BUDGET_STEPS * a.batch as u64,
            b_dec_init: BDecInit::Mean,
            init_tokens: a.batch,
            lr_warmup_steps: if a.start_l0 > 0.0 {
                LONG_BUDGET_STEPS
            } else {
                0
            },
            ..Default::default()
        };
        reset_peak_rss();
        let mut src = InMemorySource::new(data.clone(), a.d_in);
        let mut tr = Trainer::new(cfg, &arch, a.d_sae, &mut src)?;
        if a.start_l0 > 0.0 && !kind.contains("topk") {
            calibrate_l0(
                &mut tr,
                &data[..512.min(a.batch) * a.d_in],
                a.d_in,
                a.start_l0,
            )?;
        }
        let mut l0 = 0.0;
        for _ in 0..a.warmup {
            tr.step(&mut src)?;
        }
        profile::reset();
        profile::enable(a.breakdown);
        let t0 = Instant::now();
        let timed: Result<(), TrainError> = (0..a.steps).try_for_each(|_| {
            l0 = tr.step(&mut src)?.l0;
            Ok(())
        });
        let secs = t0.elapsed().as_secs_f64();
        profile::enable(false);
        timed?;
        if a.breakdown {
            phases.push((kind.clone(), secs / a.steps as f64, profile::totals()));
        }
        let tps = (a.steps as usize * a.batch) as f64 / secs;
        let rss = peak_rss_mib().map_or("?".into(), |m| format!("{m:.0} MiB"));
        drop(tr);
        let ref_kind = if kind.contains("topk") {
            "topk"
        } else {
            "relu_l1"
        };
        let torch = match &a.reference_python {
            Some(py) => match ref_cache.iter().find(|(k, _)| k == ref_kind) {
                Some((_, v)) => Some(*v),
                None => {
                    let v = reference(&a, py, ref_kind)?;
                    ref_cache.push((ref_kind.to_string(), v));
                    Some(v)
                }
            },
            None => None,
        };
        let (tcol, scol) = match torch {
            Some(t) => (format!("{t:.0} ({ref_kind})"), format!("{:.2}x", tps / t)),
            None => ("-".into(), "-".into()),
        };
        let line = format!(
            "{:<10} {:>8.1} {:>10.0} {:>12.0} {:>8.0}% {:>10} {:>14} {:>9}\n",
            kind,
            l0,
            secs * 1000.0 / a.steps as f64,
            tps,
            100.0 * tps / ceiling_tps,
            rss,
            tcol,
            scol
        );
        eprint!("{line}");
        table += &line;
    }
    if a.breakdown {
        table += &breakdown_table(&phases, a.steps);
    }
    table += &format!("load avg at end {}\n", loadavg());
    Ok(table)
}
