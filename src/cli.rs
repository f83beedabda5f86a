//! Command-line interface: clap definitions and dispatch to the stages. Parsing only;
//! the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use saepipe::util::progress::ProgressMode;

mod cluster;

/// From a Hugging Face language model to a Pareto sweep of sparse autoencoders.
#[derive(Debug, Parser)]
#[command(name = "saepipe", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, global = true)]
    pub progress: ProgressMode,
}

/// The stages and tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every stage of a pipeline (download, capture, train, evaluate); resumable.
    Run(PipelineArgs),
    /// Fetch model and dataset files into the hub cache.
    Download(PipelineArgs),
    /// Capture hookpoint activations to Parquet.
    Capture(cluster::CaptureArgs),
    /// Train one or all SAE grid points.
    Train(TrainArgs),
    /// Evaluate trained SAEs: metrics, Pareto frontier, plot.
    Evaluate(cluster::EvaluateArgs),
    /// List the units of every stage with their indices (for --shard / --unit).
    Units(cluster::UnitsArgs),
    /// Merge every unit's metrics into results/ (metrics.parquet, pareto.parquet, plot).
    Results(PipelineArgs),
    /// Write (or --submit) Slurm job arrays for a pipeline, chained with afterok.
    Slurm(cluster::SlurmArgs),
    /// Write Kubernetes Indexed Jobs for a pipeline.
    K8s(cluster::K8sArgs),
    /// Print what a pipeline costs before anything runs: tokens, windows, disk per stage
    /// (keep-everything and streamed), peak memory of capture and of each training group,
    /// and time per stage from a short calibration on this machine.
    Plan(PlanArgs),
    /// Show schema, metadata and a summary of any file saepipe writes.
    Inspect {
        /// A Parquet activation set, an SAE folder or a metrics file.
        path: PathBuf,
    },
    /// Run a model on a prompt and write hookpoint activations (and logits) to safetensors.
    Trace(TraceArgs),
    /// Measure throughput and peak memory.
    Bench {
        /// What to measure: forward, capture, train.
        what: String,
        /// Extra arguments for that benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// A pipeline file and its overrides.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline file (pipelines/*.toml).
    pub pipeline: PathBuf,
    /// Override any key of the pipeline file: --set train.batch_tokens=8192.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Use the hub cache only; never touch the network. `HF_HUB_OFFLINE=1` (or true/yes/on,
    /// any case) does the same; it is read with the hub's own rules, not as this flag.
    #[arg(long)]
    pub offline: bool,
    /// Overwrite outputs made with a different config.
    #[arg(long)]
    pub force: bool,
    /// Hub cache folder (default: HF_HUB_CACHE, else HF_HOME/hub, else
    /// ~/.cache/huggingface/hub).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl PipelineArgs {
    /// Load and validate the pipeline file with the `--set` overrides (and `--offline`).
    pub fn load(&self) -> Result<saepipe::config::Pipeline> {
        let mut sets = self.set.clone();
        if self.offline {
            sets.push("run.offline=true".to_string());
        }
        let pipeline = saepipe::config::load(&self.pipeline, &sets)?;
        // `run.data_dir = "s3://…"`: fill the local staging folder before any stage runs.
        pipeline
            .attach_remote(saepipe::util::progress::reporter(progress_mode()).as_ref())
            .with_context(|| format!("{}: connecting run.data_dir", self.pipeline.display()))?;
        Ok(pipeline)
    }

    /// Hub options from the environment, the pipeline and the flags.
    pub fn hub_options(&self, pipeline: &saepipe::config::Pipeline) -> saepipe::hub::HubOptions {
        let mut opts = saepipe::hub::HubOptions::from_env();
        if let Some(dir) = &self.cache_dir {
            opts.cache_dir = dir.clone();
        }
        opts.offline |= self.offline || pipeline.config.run.offline;
        opts
    }
}

/// `saepipe plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Skip the calibration (a few forward passes and training steps on random data):
    /// no time estimate.
    #[arg(long)]
    pub no_calibrate: bool,
}

/// `saepipe train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Train only this grid point.
    #[arg(long)]
    pub point: Option<String>,
    /// Train only unit I of `saepipe units` (one array task).
    #[arg(long, value_name = "I", conflicts_with = "point")]
    pub unit: Option<usize>,
}

/// `saepipe trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The model: a hub repo (org/name[@revision]), local:<dir> or gguf:<file>.
    pub model: String,
    /// The prompt, tokenised with the model's tokenizer.
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub text: Option<String>,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
    /// Hookpoints to record, comma-separated (blocks.1.hook_mlp_out,...).
    #[arg(long, value_delimiter = ',')]
    pub hookpoints: Vec<String>,
    /// Also write the logits.
    #[arg(long)]
    pub logits: bool,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the model runs: cpu, cuda or cuda:N (default: the first GPU when built with
    /// `--features cuda` and one is present, else the CPU).
    #[arg(long)]
    pub device: Option<String>,
    /// The model dtype: f32, bf16 or f16 (the written tensors are f32 whatever it is).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Use the hub cache only (also `HF_HUB_OFFLINE=1`).
    #[arg(long)]
    pub offline: bool,
    /// Hub cache folder (default: HF_HUB_CACHE, else HF_HOME/hub, else
    /// ~/.cache/huggingface/hub).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

static PROGRESS: std::sync::OnceLock<ProgressMode> = std::sync::OnceLock::new();

/// The `--progress` of this command.
fn progress_mode() -> ProgressMode {
    PROGRESS.get().copied().unwrap_or_default()
}

/// Upload what the last stage wrote when `run.data_dir` is object storage (a no-op else).
fn push_remote() -> Result<()> {
    let reporter = saepipe::util::progress::reporter(progress_mode());
    saepipe::store::remote::push_attached(reporter.as_ref())
        .context("uploading the run folder to run.data_dir")
}

/// Parse the command line, set up logging and run the command; with an `s3://`
/// `run.data_dir`, upload the run folder's new files afterwards.
pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(&cli.global);
    let _ = PROGRESS.set(cli.global.progress);
    match dispatch(cli) {
        Ok(code) => {
            push_remote()?;
            Ok(code)
        }
        Err(e) => {
            // What finished before the failure (units, shards) is kept for the re-run.
            if let Err(p) = push_remote() {
                tracing::warn!("{p:#}");
            }
            Err(e)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let pipeline = args.load()?;
            let _lock = saepipe::util::lock::RunLock::acquire(&pipeline.run_dir())?;
            let opts = args.hub_options(&pipeline);
            let reporter = saepipe::util::progress::reporter(cli.global.progress);
            let name = args.pipeline.display();
            if pipeline.config.capture.keep {
                saepipe::pipeline::capture::run_stage(
                    &pipeline,
                    &opts,
                    args.force,
                    reporter.as_ref(),
                )
                .with_context(|| format!("saepipe run {name}: capture"))?;
                push_remote()?;
                saepipe::pipeline::train::train_stage(
                    &pipeline,
                    None,
                    args.force,
                    reporter.as_ref(),
                )
                .with_context(|| format!("saepipe run {name}: train"))?;
            } else {
                saepipe::pipeline::stream::run_streamed(
                    &pipeline,
                    &opts,
                    args.force,
                    reporter.as_ref(),
                )
                .with_context(|| format!("saepipe run {name}: streamed capture and train"))?;
            }
            push_remote()?;
            saepipe::pipeline::jsae::jsae_stage(&pipeline, &opts, args.force, reporter.as_ref())
                .with_context(|| format!("saepipe run {name}: jsae"))?;
            let table = saepipe::pipeline::evaluate::evaluate_stage(
                &pipeline,
                &opts,
                args.force,
                reporter.as_ref(),
            )
            .with_context(|| format!("saepipe run {name}: evaluate"))?;
            print!("{table}");
            eprintln!("results: {}", pipeline.run_dir().join("results").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Download(args) => {
            let pipeline = args.load()?;
            let _lock = saepipe::util::lock::RunLock::acquire(&pipeline.run_dir())?;
            if pipeline.config.synthetic.is_some() {
                eprintln!(
                    "{}: [synthetic] pipeline, nothing to download",
                    args.pipeline.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let opts = args.hub_options(&pipeline);
            let reporter = saepipe::util::progress::reporter(cli.global.progress);
            let m = saepipe::pipeline::download::download(&pipeline, &opts, reporter.as_ref())
                .with_context(|| {
                    format!(
                        "downloading the model and dataset of {}",
                        args.pipeline.display()
                    )
                })?;
            tracing::info!(
                model = %m.model.path.display(),
                dataset_files = m.dataset.files.len(),
                manifest = %pipeline.run_dir().join(saepipe::pipeline::download::MANIFEST_FILE).display(),
                "download done"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Capture(cargs) if cargs.is_unit() => cluster::capture(cargs, cli.global.progress),
        Command::Capture(cargs) => {
            let args = cargs.pipeline;
            let pipeline = args.load()?;
            let _lock = saepipe::util::lock::RunLock::acquire(&pipeline.run_dir())?;
            let opts = args.hub_options(&pipeline);
            let reporter = saepipe::util::progress::reporter(cli.global.progress);
            let sums = saepipe::pipeline::capture::run_stage(
                &pipeline,
                &opts,
                args.force,
                reporter.as_ref(),
            )
            .with_context(|| format!("saepipe capture {}", args.pipeline.display()))?;
            for s in sums {
                tracing::info!(
                    hookpoint = %s.hookpoint,
                    split = s.split.name(),
                    tokens = s.n_tokens,
                    bytes = s.bytes,
                    dir = %s.dir.display(),
                    "{}",
                    if s.skipped { "already captured" } else { "captured" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) if args.unit.is_some() => cluster::train(args, cli.global.progress),
        Command::Train(args) => {
            let pipeline = args.pipeline.load()?;
            let _lock = saepipe::util::lock::RunLock::acquire(&pipeline.run_dir())?;
            let reporter = saepipe::util::progress::reporter(cli.global.progress);
            let n = saepipe::pipeline::train::train_stage(
                &pipeline,
                args.point.as_deref(),
                args.pipeline.force,
                reporter.as_ref(),
            )
            .with_context(|| format!("saepipe train {}", args.pipeline.pipeline.display()))?;
            // The JSAE pairs of `[jsae]` train with the rest (they need the model's MLP).
            if args.point.is_none() {
                let opts = args.pipeline.hub_options(&pipeline);
                saepipe::pipeline::jsae::jsae_stage(
                    &pipeline,
                    &opts,
                    args.pipeline.force,
                    reporter.as_ref(),
                )
                .with_context(|| {
                    format!("saepipe train {}: jsae", args.pipeline.pipeline.display())
                })?;
            }
            tracing::info!(trained = n, "train done");
            Ok(ExitCode::SUCCESS)
        }
        Command::Evaluate(eargs) if eargs.unit.is_some() => {
            cluster::evaluate(eargs, cli.global.progress)
        }
        Command::Evaluate(eargs) => {
            let args = eargs.pipeline;
            let pipeline = args.load()?;
            let _lock = saepipe::util::lock::RunLock::acquire(&pipeline.run_dir())?;
            let opts = args.hub_options(&pipeline);
            let reporter = saepipe::util::progress::reporter(cli.global.progress);
            let table = saepipe::pipeline::evaluate::evaluate_stage(
                &pipeline,
                &opts,
                args.force,
                reporter.as_ref(),
            )
            .with_context(|| format!("saepipe evaluate {}", args.pipeline.display()))?;
            print!("{table}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Units(args) => cluster::units(args, cli.global.progress),
        Command::Results(args) => cluster::results(args),
        Command::Slurm(args) => cluster::slurm(args, cli.global.progress),
        Command::K8s(args) => cluster::k8s(args, cli.global.progress),
        Command::Plan(pargs) => {
            let args = &pargs.pipeline;
            let pipeline = args.load()?;
            let opts = args.hub_options(&pipeline);
            let shape = saepipe::pipeline::plan::model_shape(&pipeline, &opts.cache_dir)
                .with_context(|| format!("saepipe plan {}", args.pipeline.display()))?;
            print!(
                "{}",
                saepipe::pipeline::plan::render(&pipeline, &shape, !pargs.no_calibrate)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path } => {
            print!("{}", saepipe::tools::inspect::inspect(&path)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Trace(args) => trace(args, cli.global.progress),
        Command::Bench { what, args } => {
            saepipe::tools::bench::run(&what, &args)
                .with_context(|| format!("saepipe bench {what}"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `saepipe trace`: parse the arguments into a [`saepipe::tools::trace::TraceRequest`] and run it.
fn trace(a: TraceArgs, progress: ProgressMode) -> Result<ExitCode> {
    use saepipe::models::ModelSource;
    use saepipe::tools::trace::{TraceInput, TraceRequest};
    let source: ModelSource = a.model.parse()?;
    let dtype = saepipe::models::parse_model_dtype(&a.dtype)
        .with_context(|| format!("--dtype {}: use f32, bf16 or f16", a.dtype))?;
    // The device before the hub: a missing GPU is reported before any download.
    let device = match &a.device {
        Some(d) => saepipe::models::DeviceSpec::parse_for("--device", d)?.open("--device")?,
        None => saepipe::models::default_device(),
    };
    // A hub source comes from the hub cache, or is downloaded into it, as in capture.
    let mut opts = saepipe::hub::HubOptions::from_env();
    opts.offline |= a.offline;
    if let Some(dir) = &a.cache_dir {
        opts.cache_dir = dir.clone();
    }
    let reporter = saepipe::util::progress::reporter(progress);
    let input = match (a.text, a.token_ids) {
        (Some(t), None) => TraceInput::Text(t),
        (None, Some(ids)) => TraceInput::TokenIds(ids),
        _ => bail!("give exactly one of --text or --token-ids"),
    };
    let req = TraceRequest {
        source,
        input,
        hookpoints: a.hookpoints,
        logits: a.logits,
        out: a.out,
        dtype,
    };
    let summary = saepipe::tools::trace::trace_source(&req, &opts, reporter.as_ref(), &device)
        .with_context(|| format!("tracing {}", a.model))?;
    eprintln!(
        "wrote {} ({} tokens: {})",
        summary.out.display(),
        summary.token_ids.len(),
        summary.tensors.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn init_logging(g: &GlobalArgs) {
    use tracing_subscriber::EnvFilter;
    let default = match (g.quiet, g.verbose) {
        (true, _) => "warn",
        (false, 0) => "saepipe=info",
        (false, 1) => "saepipe=debug",
        (false, _) => "saepipe=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_colours())
        .with_target(false)
        .try_init();
}

/// Colour escape codes only for a person at a terminal: never when stderr is a pipe or a
/// file (CI logs, `2> log`), and never when `NO_COLOR` is set to anything non-empty
/// (no-color.org).
fn stderr_colours() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    std::io::stderr().is_terminal() && !no_color
}
