//! `saepipe bench gpu`: the GPU table of issue 13 item 5 in one run. Forward tokens/s of
//! random-weight models of the Pythia-1B and SmolLM3-3B shapes, to mid-depth and full depth,
//! and TopK SAE training tokens/s at d_in 2048, d_sae 16384 / 65536, each in bf16 and f32,
//! with peak GPU memory and the fraction of the GPU's dense bf16 matmul peak each reaches;
//! optionally the same rows through PyTorch/transformers
//! (`benches/reference/gpu_bench_torch.py`) beside ours.
//!
//! ```text
//! saepipe bench gpu --device cuda [--reference-python python3]      # the full table
//! saepipe bench gpu --device cpu --shapes tiny-neox,tiny-llama --batch 2 --seq 16 \
//!     --train-d-in 32 --train-d-sae 128 --train-k 8 --train-batch 64  # a CPU smoke run
//! ```
//!
//! FLOP counts (written in the table header too):
//! - forward, per token: `2·N + 4·L·S·A`, where N = the matmul weights of the L blocks run
//!   (plus the unembedding `d·V` at full depth), S = sequence length, A = attention width
//!   (heads × head_dim): the PaLM convention (QKᵀ and AV counted as full S×S products, no
//!   causal discount; embeddings, norms and softmax not counted).
//! - TopK training step: `12·B·d_in·d_sae`: six dense `B×d_in×d_sae` products (encoder and
//!   decoder forward; decoder weight and input gradients; encoder weight and input
//!   gradients, the latter because `x − b_dec` carries b_dec's gradient).
//! - "% peak" divides achieved FLOP/s by `--peak-tflops` (default 989, the H100/H200 SXM
//!   dense bf16 tensor-core peak), for the f32 rows too.
//!
//! Peak GPU memory is sampled from `nvidia-smi` every 50 ms while a row runs (device-wide,
//! minus what was in use just before the row: candle has no allocator statistics); the
//! torch rows report `torch.cuda.max_memory_reserved`.
//!
//! Decision: the TopK training rows run the training engine itself (`train::Trainer` on
//! its tensor backend, `train.backend = "tensor"`, on `--device`): the step a pipeline runs
//! — host batch up, input scaling, the variant's tensor forward with exact top-k by
//! bisection and AuxK, candle autograd, unit-norm projection, clipping, Adam, decoder
//! renormalisation, dead counters, the scalars back — on its device-resident state
//! (`--train-paths resident`, the default) and, with `--train-paths resident,round-trip`,
//! also on the host round trip it replaced (parameters up, gradients and codes down, host
//! Adam, every step), for comparison. A bf16/f16 training row is the engine with
//! `train.compute_dtype` = that dtype: the encoder and decoder GEMMs take bf16/f16 operands
//! (tensor cores), while parameters, Adam's moments, the top-k selection and every
//! reduction stay f32 (mixed precision as in autocast).
//!
//! Decision: the models' compute dtype is what their weights were built with; a build
//! whose models always compute in f32 is caught by checking the dtype of a recorded
//! activation, and such rows are reported as unsupported instead of mislabelled.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rand::{Rng, SeedableRng};

use super::BenchError;
use crate::models::gpt_neox::{GptNeoX, GptNeoXConfig};
use crate::models::llama::{Llama, LlamaConfig};
use crate::models::weights::Weights;
use crate::models::{DeviceSpec, HookedModel, Hookpoint, NoHooks, Recorder, Site};
use crate::sae::ArchConfig;
use crate::store::InMemorySource;
use crate::train::{BDecInit, Backend, TrainConfig, Trainer};

/// Arguments of `saepipe bench gpu`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "saepipe bench gpu",
    about = "GPU forward and TopK-training throughput, memory and fraction of peak"
)]
pub struct GpuArgs {
    /// `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Model shapes for the forward rows (pythia-1b, smollm3-3b, tiny-neox, tiny-llama).
    #[arg(long, value_delimiter = ',', default_value = "pythia-1b,smollm3-3b")]
    pub shapes: Vec<String>,
    /// Dtypes of every row (bf16, f16, f32).
    #[arg(long, value_delimiter = ',', default_value = "bf16,f32")]
    pub dtypes: Vec<String>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Timed forward passes per row.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Untimed passes / steps before each row.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// SAE input width.
    #[arg(long, default_value_t = 2048)]
    pub train_d_in: usize,
    /// SAE dictionary widths, one row each.
    #[arg(long, value_delimiter = ',', default_value = "16384,65536")]
    pub train_d_sae: Vec<usize>,
    /// k of the TopK SAE.
    #[arg(long, default_value_t = 64)]
    pub train_k: usize,
    /// Tokens per training step.
    #[arg(long, default_value_t = 4096)]
    pub train_batch: usize,
    /// Timed training steps per row.
    #[arg(long, default_value_t = 5)]
    pub train_steps: usize,
    /// The engine's tensor-backend paths of the training rows: resident (device-resident
    /// state, what training runs) and/or round-trip (the host round trip, for comparison).
    #[arg(long, value_delimiter = ',', default_value = "resident")]
    pub train_paths: Vec<String>,
    /// What to run: forward, train or both.
    #[arg(long, value_delimiter = ',', default_value = "forward,train")]
    pub only: Vec<String>,
    /// The dense bf16 matmul peak in TFLOP/s the "% peak" column divides by.
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// A Python with torch (+ transformers for the forward rows): runs the reference
    /// script for every row on the same device and adds its rows.
    #[arg(long)]
    pub reference_python: Option<PathBuf>,
    /// The reference script.
    #[arg(long, default_value = "benches/reference/gpu_bench_torch.py")]
    pub reference_script: PathBuf,
}

/// A transformer shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Name on the command line.
    pub name: &'static str,
    /// GPT-NeoX (Pythia) or SmolLM3 (llama family).
    pub neox: bool,
    /// Residual width.
    pub d: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub ff: usize,
    /// Vocabulary.
    pub vocab: usize,
}

/// The shapes `--shapes` knows: the two of the issue (from their Hugging Face configs) and
/// two tiny ones for CPU smoke runs.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "pythia-1b",
        neox: true,
        d: 2048,
        layers: 16,
        heads: 8,
        kv_heads: 8,
        ff: 8192,
        vocab: 50304,
    },
    Shape {
        name: "smollm3-3b",
        neox: false,
        d: 2048,
        layers: 36,
        heads: 16,
        kv_heads: 4,
        ff: 11008,
        vocab: 128256,
    },
    Shape {
        name: "tiny-neox",
        neox: true,
        d: 64,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        ff: 256,
        vocab: 512,
    },
    Shape {
        name: "tiny-llama",
        neox: false,
        d: 64,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        ff: 192,
        vocab: 512,
    },
];

impl Shape {
    fn head_dim(&self) -> usize {
        self.d / self.heads
    }

    /// Matmul weights of one block.
    pub fn block_matmul_params(&self) -> usize {
        let (d, hd) = (self.d, self.head_dim());
        if self.neox {
            4 * d * d + 2 * d * self.ff
        } else {
            2 * d * self.heads * hd + 2 * d * self.kv_heads * hd + 3 * d * self.ff
        }
    }

    /// Forward FLOPs per token through `blocks` blocks at sequence length `seq`, plus the
    /// unembedding when `full` (see the module docs).
    pub fn forward_flops_per_token(&self, blocks: usize, seq: usize, full: bool) -> f64 {
        let n = blocks * self.block_matmul_params() + if full { self.d * self.vocab } else { 0 };
        2.0 * n as f64 + 4.0 * (blocks * seq * self.heads * self.head_dim()) as f64
    }

    /// The `config.json` of a model of this shape.
    pub fn config_json(&self) -> serde_json::Value {
        if self.neox {
            serde_json::json!({
                "model_type": "gpt_neox", "vocab_size": self.vocab, "hidden_size": self.d,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "intermediate_size": self.ff, "hidden_act": "gelu", "rotary_pct": 0.25,
                "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "use_parallel_residual": true,
                "tie_word_embeddings": false, "max_position_embeddings": 2048
            })
        } else {
            serde_json::json!({
                "model_type": "smollm3", "vocab_size": self.vocab, "hidden_size": self.d,
                "intermediate_size": self.ff, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim(), "hidden_act": "silu", "rms_norm_eps": 1e-6,
                "rope_theta": 5_000_000.0, "tie_word_embeddings": true,
                "max_position_embeddings": 65536, "no_rope_layer_interval": 4
            })
        }
    }

    /// Every tensor of the checkpoint, by Hugging Face name and shape.
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, ff, v, hd) = (self.d, self.ff, self.vocab, self.head_dim());
        let mut t: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |n: String, s: &[usize]| t.push((n, s.to_vec()));
        if self.neox {
            add("gpt_neox.embed_in.weight".into(), &[v, d]);
            for i in 0..self.layers {
                let p = format!("gpt_neox.layers.{i}");
                for ln in ["input_layernorm", "post_attention_layernorm"] {
                    add(format!("{p}.{ln}.weight"), &[d]);
                    add(format!("{p}.{ln}.bias"), &[d]);
                }
                for (name, o, i_) in [
                    ("attention.query_key_value", 3 * d, d),
                    ("attention.dense", d, d),
                    ("mlp.dense_h_to_4h", ff, d),
                    ("mlp.dense_4h_to_h", d, ff),
                ] {
                    add(format!("{p}.{name}.weight"), &[o, i_]);
                    add(format!("{p}.{name}.bias"), &[o]);
                }
            }
            add("gpt_neox.final_layer_norm.weight".into(), &[d]);
            add("gpt_neox.final_layer_norm.bias".into(), &[d]);
            add("embed_out.weight".into(), &[v, d]);
        } else {
            add("model.embed_tokens.weight".into(), &[v, d]);
            for i in 0..self.layers {
                let p = format!("model.layers.{i}");
                add(format!("{p}.input_layernorm.weight"), &[d]);
                add(format!("{p}.post_attention_layernorm.weight"), &[d]);
                for (name, o, i_) in [
                    ("self_attn.q_proj", self.heads * hd, d),
                    ("self_attn.k_proj", self.kv_heads * hd, d),
                    ("self_attn.v_proj", self.kv_heads * hd, d),
                    ("self_attn.o_proj", d, self.heads * hd),
                    ("mlp.gate_proj", ff, d),
                    ("mlp.up_proj", ff, d),
                    ("mlp.down_proj", d, ff),
                ] {
                    add(format!("{p}.{name}.weight"), &[o, i_]);
                }
            }
            add("model.norm.weight".into(), &[d]);
        }
        t
    }
}

/// Find a shape by name.
pub fn shape(name: &str) -> Result<Shape, BenchError> {
    SHAPES
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            BenchError::Usage(format!(
                "unknown shape '{name}'; known: {}",
                names.join(", ")
            ))
        })
}

/// Parse `cpu`, `cuda` or `cuda:N` and open it.
pub fn open_device(s: &str) -> Result<Device, BenchError> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                BenchError::Usage(format!(
                    "--device {s}: not a device; use cpu, cuda or cuda:N"
                ))
            })?,
    };
    Device::new_cuda(ordinal).map_err(|e| {
        BenchError::Usage(format!(
            "--device {s}: cannot open the GPU ({e}); this needs a binary built with \
             `--features cuda` (make build-cuda) on a machine with an NVIDIA driver, or use --device cpu"
        ))
    })
}

/// Parse a dtype name.
pub fn parse_dtype(s: &str) -> Result<DType, BenchError> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(BenchError::Usage(format!(
            "--dtypes: unknown dtype '{other}'; use bf16, f16 or f32"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// A random-weight model of `shape` on `device`, weights made in `dtype` (norm weights 1,
/// biases 0, the rest N(0, 0.02²), drawn on the device).
pub fn random_model(
    shape: &Shape,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn HookedModel>, BenchError> {
    let origin = PathBuf::from(format!("random:{}", shape.name));
    let mut map = HashMap::new();
    for (name, dims) in shape.tensors() {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(dims.as_slice(), dtype, device)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(dims.as_slice(), dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02f32, dims.as_slice(), device)?.to_dtype(dtype)?
        };
        map.insert(name, t);
    }
    let model_type = if shape.neox { "gpt_neox" } else { "smollm3" };
    let weights = Weights::from_tensors(&origin, model_type, map, device).with_dtype(dtype);
    let json = shape.config_json();
    let bad = |e: serde_json::Error| BenchError::Usage(format!("shape {}: {e}", shape.name));
    let model: Box<dyn HookedModel> = if shape.neox {
        let cfg: GptNeoXConfig = serde_json::from_value(json).map_err(bad)?;
        cfg.validate(&origin)?;
        Box::new(GptNeoX::new(&cfg, &weights)?)
    } else {
        let cfg: LlamaConfig = serde_json::from_value(json).map_err(bad)?;
        cfg.validate(&origin)?;
        Box::new(Llama::new(&cfg, &weights)?)
    };
    Ok(model)
}

/// The dtype `model` computes in: that of block 0's output on a short input.
fn compute_dtype(model: &dyn HookedModel) -> Result<DType, BenchError> {
    let hp = Hookpoint::new(0, Site::ResidPost);
    let mut rec = Recorder::new([hp]);
    let ids = Tensor::zeros((1, 4), DType::U32, model.device())?;
    model.forward_hooked(&ids, &mut rec, Some(0))?;
    rec.acts
        .get(&hp)
        .map(|t| t.dtype())
        .ok_or_else(|| BenchError::Usage("block 0 recorded nothing".into()))
}

/// Device-wide GPU memory in use, sampled by `nvidia-smi` every 50 ms.
struct MemMonitor {
    child: Option<Child>,
    peak: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
}

impl MemMonitor {
    fn start(device: &Device) -> Self {
        let none = Self {
            child: None,
            peak: Arc::new(AtomicU64::new(0)),
            last: Arc::new(AtomicU64::new(0)),
        };
        let Device::Cuda(_) = device else {
            return none;
        };
        let ordinal = match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        };
        let spawned = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "50",
                "-i",
                &ordinal.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = spawned else {
            tracing::warn!("nvidia-smi not found: no GPU memory column");
            return none;
        };
        let Some(out) = child.stdout.take() else {
            return none;
        };
        let (peak, last) = (none.peak.clone(), none.last.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mib) = line.trim().parse::<u64>() {
                    last.store(mib, Ordering::Relaxed);
                    peak.fetch_max(mib, Ordering::Relaxed);
                }
            }
        });
        // The first sample, so the first row has a baseline.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Self {
            child: Some(child),
            peak: none.peak.clone(),
            last: none.last.clone(),
        }
    }

    /// Start a row: returns the baseline (MiB in use now).
    fn reset(&self) -> u64 {
        std::thread::sleep(std::time::Duration::from_millis(120));
        let now = self.last.load(Ordering::Relaxed);
        self.peak.store(now, Ordering::Relaxed);
        now
    }

    /// Peak MiB since [`Self::reset`] above `baseline`, when sampling works.
    fn peak_above(&self, baseline: u64) -> Option<u64> {
        self.child.as_ref()?;
        std::thread::sleep(std::time::Duration::from_millis(120));
        Some(self.peak.load(Ordering::Relaxed).saturating_sub(baseline))
    }
}

impl Drop for MemMonitor {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// `forward` or `train`.
    pub what: String,
    /// Shape or SAE size.
    pub case: String,
    /// Depth or `k=..`.
    pub depth: String,
    /// bf16 / f32.
    pub dtype: String,
    /// saepipe (candle) or torch.
    pub implementation: String,
    /// Tokens per second; `None` with a note when the row could not run.
    pub tokens_per_s: Option<f64>,
    /// FLOPs per token.
    pub flops_per_token: f64,
    /// Peak memory in MiB.
    pub peak_mib: Option<u64>,
    /// Why the row is empty, or a remark.
    pub note: String,
}

/// Parse `args` and print the table.
pub fn run_cli(args: &[String]) -> Result<(), BenchError> {
    let argv = std::iter::once("saepipe bench gpu".to_string()).chain(args.iter().cloned());
    let a = GpuArgs::try_parse_from(argv).map_err(|e| BenchError::Usage(e.to_string()))?;
    let rows = run(&a)?;
    print!("{}", table(&a, &rows));
    Ok(())
}

/// Run every row.
pub fn run(a: &GpuArgs) -> Result<Vec<Row>, BenchError> {
    let device = open_device(&a.device)?;
    let dtypes = a
        .dtypes
        .iter()
        .map(|s| parse_dtype(s))
        .collect::<Result<Vec<_>, _>>()?;
    let shapes = a
        .shapes
        .iter()
        .map(|s| shape(s))
        .collect::<Result<Vec<_>, _>>()?;
    for o in &a.only {
        if o != "forward" && o != "train" {
            return Err(BenchError::Usage(format!(
                "--only: unknown part '{o}'; use forward, train or both"
            )));
        }
    }
    let mon = MemMonitor::start(&device);
    let mut rows = Vec::new();
    if a.only.iter().any(|o| o == "forward") {
        for s in &shapes {
            for &dt in &dtypes {
                let new = forward_rows(a, s, &device, dt, &mon)?;
                for r in &new {
                    eprintln!("{}", row_line(r, a.peak_tflops));
                }
                rows.extend(new);
                if let Some(py) = &a.reference_python {
                    let mid = s.layers / 2;
                    for stop in [None, Some(mid)] {
                        let r = reference_forward(a, py, s, dt, stop);
                        eprintln!("{}", row_line(&r, a.peak_tflops));
                        rows.push(r);
                    }
                }
            }
        }
    }
    let paths = a
        .train_paths
        .iter()
        .map(|s| TrainPath::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    if a.only.iter().any(|o| o == "train") {
        for &d_sae in &a.train_d_sae {
            for &dt in &dtypes {
                for &path in &paths {
                    let r = train_row(a, dt, d_sae, path, &mon)?;
                    eprintln!("{}", row_line(&r, a.peak_tflops));
                    rows.push(r);
                }
                if let Some(py) = &a.reference_python {
                    let r = reference_train(a, py, dt, d_sae);
                    eprintln!("{}", row_line(&r, a.peak_tflops));
                    rows.push(r);
                }
            }
        }
    }
    Ok(rows)
}

const OURS: &str = "saepipe (candle)";
const TORCH: &str = "torch";

/// The full-depth and mid-depth rows of one shape and dtype.
fn forward_rows(
    a: &GpuArgs,
    s: &Shape,
    device: &Device,
    dt: DType,
    mon: &MemMonitor,
) -> Result<Vec<Row>, BenchError> {
    let mid = s.layers / 2;
    let cases = [
        (format!("full ({} blocks)", s.layers), None, s.layers),
        (format!("blocks 0..={mid}"), Some(mid), mid + 1),
    ];
    let base = mon.reset();
    let t_build = Instant::now();
    let model = random_model(s, device, dt)?;
    let got = compute_dtype(model.as_ref())?;
    tracing::info!(
        "{} {}: random weights in {:.1}s",
        s.name,
        dtype_name(dt),
        t_build.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    if got != dt {
        for (depth, _, blocks) in cases {
            rows.push(Row {
                what: "forward".into(),
                case: s.name.into(),
                depth,
                dtype: dtype_name(dt).into(),
                implementation: OURS.into(),
                tokens_per_s: None,
                flops_per_token: s.forward_flops_per_token(blocks, a.seq, false),
                peak_mib: None,
                note: format!(
                    "unsupported: this build's models compute in {} whatever the weights",
                    dtype_name(got)
                ),
            });
        }
        return Ok(rows);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|_| rng.random_range(0..s.vocab as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), device)?;
    for (depth, stop, blocks) in cases {
        for _ in 0..a.warmup {
            model.forward_hooked(&ids, &mut NoHooks, stop)?;
        }
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..a.iters.max(1) {
            model.forward_hooked(&ids, &mut NoHooks, stop)?;
        }
        device.synchronize()?;
        let secs = t0.elapsed().as_secs_f64() / a.iters.max(1) as f64;
        rows.push(Row {
            what: "forward".into(),
            case: s.name.into(),
            depth,
            dtype: dtype_name(dt).into(),
            implementation: OURS.into(),
            tokens_per_s: Some((a.batch * a.seq) as f64 / secs),
            flops_per_token: s.forward_flops_per_token(blocks, a.seq, stop.is_none()),
            peak_mib: None,
            note: format!("batch {}x{}", a.batch, a.seq),
        });
    }
    let peak = mon.peak_above(base);
    for r in &mut rows {
        r.peak_mib = peak;
    }
    Ok(rows)
}

/// Which of the engine's tensor-backend paths a training row runs (`--train-paths`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainPath {
    /// Device-resident state (`train::resident`): what `train.backend = "tensor"` runs.
    Resident,
    /// The host round trip (parameters up, gradients and codes down, host Adam, every
    /// step): the tensor backend before device residency, for comparison.
    RoundTrip,
}

impl TrainPath {
    fn parse(s: &str) -> Result<Self, BenchError> {
        match s {
            "resident" => Ok(TrainPath::Resident),
            "round-trip" => Ok(TrainPath::RoundTrip),
            other => Err(BenchError::Usage(format!(
                "--train-paths: unknown path '{other}'; use resident, round-trip or both"
            ))),
        }
    }
    fn name(self) -> &'static str {
        match self {
            TrainPath::Resident => "resident",
            TrainPath::RoundTrip => "round trip",
        }
    }
}

/// A TopK SAE (`k = --train-k`, AuxK on) in the training engine on its tensor backend on
/// `device`: `train_batch`-row steps of the real engine loop (input scaling, candle
/// autograd, unit-norm projection, clipping, Adam, renormalisation, dead counters), timed
/// per step from the host batch to the scalars back.
pub fn engine_trainer(
    a: &GpuArgs,
    device: DeviceSpec,
    d_sae: usize,
    dt: DType,
    x: &[f32],
) -> Result<Trainer, BenchError> {
    let arch = ArchConfig::new(crate::sae::topk::Config {
        k: a.train_k,
        ..Default::default()
    });
    let b = a.train_batch;
    let cfg = TrainConfig {
        batch_tokens: b,
        // long enough that no timed step is the last one (whose state comes back)
        total_tokens: 1000 * (a.warmup + a.train_steps + 1) as u64 * b as u64,
        lr: Some(2e-4),
        lr_warmup_steps: 0,
        lr_decay_frac: 0.0,
        b_dec_init: BDecInit::Mean,
        init_tokens: b,
        checkpoint_every: 0,
        log_every: 1,
        device,
        backend: Backend::Tensor,
        compute_dtype: match dt {
            DType::BF16 => crate::train::ComputeDtype::Bf16,
            DType::F16 => crate::train::ComputeDtype::F16,
            _ => crate::train::ComputeDtype::F32,
        },
        ..Default::default()
    };
    let mut src = InMemorySource::new(x.to_vec(), a.train_d_in);
    Trainer::new(cfg, &arch, d_sae, &mut src).map_err(|e| BenchError::Train(e.to_string()))
}

fn train_row(
    a: &GpuArgs,
    dt: DType,
    d_sae: usize,
    path: TrainPath,
    mon: &MemMonitor,
) -> Result<Row, BenchError> {
    let (d_in, b) = (a.train_d_in, a.train_batch);
    let mut row = Row {
        what: "train topk".into(),
        case: format!("{d_in}x{d_sae}"),
        depth: format!("k={} B={b}", a.train_k),
        dtype: dtype_name(dt).into(),
        implementation: format!("{OURS}, engine {}", path.name()),
        tokens_per_s: None,
        flops_per_token: 12.0 * (d_in * d_sae) as f64,
        peak_mib: None,
        note: String::new(),
    };
    let device = DeviceSpec::parse_for("--device", &a.device)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let base = mon.reset();
    // Two fixed host batches of Gaussian rows, alternated: throughput does not depend on
    // the data, and every step uploads its batch as a real run does.
    let mut rng = crate::util::rng::Rng::new(1);
    let xs: [Vec<f32>; 2] =
        std::array::from_fn(|_| (0..b * d_in).map(|_| rng.normal() as f32).collect());
    let mut tr = engine_trainer(a, device, d_sae, dt, &xs[0])?;
    if path == TrainPath::RoundTrip {
        tr.force_host_round_trip();
    }
    let terr = |e: crate::train::TrainError| BenchError::Train(e.to_string());
    for i in 0..a.warmup {
        tr.step_on(&[&xs[i % 2]], b).map_err(terr)?;
    }
    let steps = a.train_steps.max(1);
    let t0 = Instant::now();
    let mut last = None;
    for i in 0..steps {
        last = Some(tr.step_on(&[&xs[i % 2]], b).map_err(terr)?);
    }
    let secs = t0.elapsed().as_secs_f64();
    row.peak_mib = mon.peak_above(base);
    let (loss, l0) = last.map_or((f64::NAN, f64::NAN), |r| (r.loss, r.l0));
    if !loss.is_finite() {
        return Err(BenchError::Usage(format!(
            "TopK training d_sae {d_sae} {}: the loss is {loss}",
            dtype_name(dt)
        )));
    }
    row.tokens_per_s = Some((steps * b) as f64 / secs);
    row.note = format!(
        "L0 {l0:.1}, loss {loss:.3}, {:.1} ms/step",
        1e3 * secs / steps as f64
    );
    Ok(row)
}

/// Run the reference script with `args`; its last `{...}` line is the result.
fn reference_json(
    a: &GpuArgs,
    py: &Path,
    args: &[String],
) -> Result<serde_json::Value, BenchError> {
    let mut cmd = Command::new(py);
    cmd.arg(&a.reference_script)
        .args(["--device", &a.device])
        .args(args);
    let shown = format!("{cmd:?}");
    let fail = |detail: String| BenchError::Reference {
        cmd: shown.clone(),
        detail,
    };
    let out = cmd.output().map_err(|e| fail(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        return Err(fail(format!("{}: {}", out.status, tail.join(" | "))));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| fail("no JSON line in its output".into()))?;
    serde_json::from_str(line).map_err(|e| fail(e.to_string()))
}

fn reference_row(mut row: Row, got: Result<serde_json::Value, BenchError>) -> Row {
    match got {
        Ok(v) => {
            row.tokens_per_s = v["tokens_per_s"].as_f64();
            row.peak_mib = v["peak_reserved_mib"].as_f64().map(|m| m as u64);
            row.note = v["note"].as_str().unwrap_or_default().to_string();
        }
        Err(e) => row.note = format!("failed: {e}"),
    }
    row
}

fn reference_forward(a: &GpuArgs, py: &Path, s: &Shape, dt: DType, stop: Option<usize>) -> Row {
    let blocks = stop.map_or(s.layers, |l| l + 1);
    let mut args: Vec<String> = vec![
        "forward".into(),
        "--config-json".into(),
        s.config_json().to_string(),
        "--dtype".into(),
        dtype_name(dt).into(),
        "--batch".into(),
        a.batch.to_string(),
        "--seq".into(),
        a.seq.to_string(),
        "--iters".into(),
        a.iters.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
    ];
    if let Some(l) = stop {
        args.extend(["--stop-layer".into(), l.to_string()]);
    }
    let row = Row {
        what: "forward".into(),
        case: s.name.into(),
        depth: match stop {
            None => format!("full ({} blocks)", s.layers),
            Some(l) => format!("blocks 0..={l}"),
        },
        dtype: dtype_name(dt).into(),
        implementation: TORCH.into(),
        tokens_per_s: None,
        flops_per_token: s.forward_flops_per_token(blocks, a.seq, stop.is_none()),
        peak_mib: None,
        note: String::new(),
    };
    reference_row(row, reference_json(a, py, &args))
}

fn reference_train(a: &GpuArgs, py: &Path, dt: DType, d_sae: usize) -> Row {
    let args: Vec<String> = vec![
        "train".into(),
        "--d-in".into(),
        a.train_d_in.to_string(),
        "--d-sae".into(),
        d_sae.to_string(),
        "--k".into(),
        a.train_k.to_string(),
        "--batch".into(),
        a.train_batch.to_string(),
        "--dtype".into(),
        dtype_name(dt).into(),
        "--steps".into(),
        a.train_steps.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
    ];
    let row = Row {
        what: "train topk".into(),
        case: format!("{}x{d_sae}", a.train_d_in),
        depth: format!("k={} B={}", a.train_k, a.train_batch),
        dtype: dtype_name(dt).into(),
        implementation: TORCH.into(),
        tokens_per_s: None,
        flops_per_token: 12.0 * (a.train_d_in * d_sae) as f64,
        peak_mib: None,
        note: String::new(),
    };
    reference_row(row, reference_json(a, py, &args))
}

fn row_line(r: &Row, peak_tflops: f64) -> String {
    let (tps, tflops, pct) = match r.tokens_per_s {
        Some(t) => {
            let f = t * r.flops_per_token / 1e12;
            (
                format!("{t:.0}"),
                format!("{f:.1}"),
                format!("{:.1}%", 100.0 * f / peak_tflops),
            )
        }
        None => ("-".into(), "-".into(), "-".into()),
    };
    let mem = r.peak_mib.map_or("-".into(), |m| m.to_string());
    format!(
        "| {} | {} | {} | {} | {} | {tps} | {tflops} | {pct} | {mem} | {} |",
        r.what, r.case, r.depth, r.dtype, r.implementation, r.note
    )
}

/// The Markdown table, with the run's settings and FLOP conventions above it.
pub fn table(a: &GpuArgs, rows: &[Row]) -> String {
    let mut s = format!(
        "bench gpu: device={} forward batch {}x{} iters {} (+{} warm-up); TopK train d_in {} B {} k {} steps {}; \
         % peak = achieved / {} TFLOP/s (dense bf16)\n\
         FLOPs: forward/token = 2*(matmul weights run, + d*vocab at full depth) + 4*blocks*seq*attn_width; \
         train/token = 12*d_in*d_sae. Peak MiB: ours = nvidia-smi device-wide above the row's start, torch = max_memory_reserved\n",
        a.device,
        a.batch,
        a.seq,
        a.iters,
        a.warmup,
        a.train_d_in,
        a.train_batch,
        a.train_k,
        a.train_steps,
        a.peak_tflops
    );
    s += "| what | case | depth | dtype | implementation | tokens/s | TFLOP/s | % peak | peak MiB | note |\n";
    s += "|---|---|---|---|---|---:|---:|---:|---:|---|\n";
    for r in rows {
        s += &row_line(r, a.peak_tflops);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_counts_match_the_published_sizes() {
        // Pythia-1B: 805M block weights (+103M unembedding); SmolLM3-3B: 2.8B block weights.
        let p = shape("pythia-1b").unwrap();
        assert_eq!(p.block_matmul_params() * p.layers, 805_306_368);
        let s = shape("smollm3-3b").unwrap();
        let n = s.block_matmul_params() * s.layers;
        assert!((2.7e9..2.9e9).contains(&(n as f64)), "{n}");
        // Mid depth without the unembedding costs less than full depth.
        assert!(
            p.forward_flops_per_token(8, 1024, false) < p.forward_flops_per_token(16, 1024, true)
        );
    }

    #[test]
    fn unknown_names_are_refused_with_the_choices() {
        assert!(shape("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("pythia-1b"));
        assert!(parse_dtype("f8").unwrap_err().to_string().contains("bf16"));
        assert!(open_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("cuda:N"));
    }

    #[test]
    fn engine_topk_training_lowers_the_loss_on_cpu() {
        let a = GpuArgs::try_parse_from([
            "gpu",
            "--device",
            "cpu",
            "--train-d-in",
            "16",
            "--train-k",
            "4",
            "--train-batch",
            "32",
        ])
        .unwrap();
        let mut rng = crate::util::rng::Rng::new(3);
        let x: Vec<f32> = (0..32 * 16).map(|_| rng.normal() as f32).collect();
        let mut tr = engine_trainer(&a, DeviceSpec::Cpu, 64, DType::F32, &x).unwrap();
        let first = tr.step_on(&[&x], 32).unwrap().loss;
        let mut last = first;
        for _ in 0..30 {
            last = tr.step_on(&[&x], 32).unwrap().loss;
        }
        assert!(last < first, "{first} -> {last}");
        assert!(TrainPath::parse("sideways").is_err());
    }

    #[test]
    fn tiny_shapes_run_forward_on_cpu() {
        for name in ["tiny-neox", "tiny-llama"] {
            let s = shape(name).unwrap();
            let m = random_model(&s, &Device::Cpu, DType::F32).unwrap();
            assert_eq!(compute_dtype(m.as_ref()).unwrap(), DType::F32);
            let ids = Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap();
            let logits = m.forward_hooked(&ids, &mut NoHooks, None).unwrap().unwrap();
            assert_eq!(logits.dims(), &[2, 8, s.vocab]);
        }
    }
}
