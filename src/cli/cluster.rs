//! The one-unit commands and the cluster generators (issue 15): `capture --shard/--finalize`,
//! `train --unit`, `evaluate --unit`, `units`, `results`, `slurm`, `k8s`. Parsing and
//! locking only; the work lives in `saepipe::pipeline` and `saepipe::tools::cluster`.
//!
//! Locks: a one-unit command holds the run folder's lock shared and its unit's lock
//! exclusively (`saepipe::util::lock`), so array tasks of different units run side by side
//! and a whole-stage command refuses while any runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use saepipe::capture::Select;
use saepipe::pipeline::units::{parse_range, Units};
use saepipe::tools::cluster::{k8s, slurm, Invocation};
use saepipe::util::lock::{RunLock, UnitLock};
use saepipe::util::progress::ProgressMode;

use super::{PipelineArgs, TrainArgs};

/// `saepipe capture`.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Capture only these units of `saepipe units`: I, I..J (J excluded) or I..=J. Writes
    /// no manifest; run `--finalize` once every shard is there.
    #[arg(long, value_name = "I[..J]", value_parser = parse_range, conflicts_with = "finalize")]
    pub shard: Option<std::ops::Range<usize>>,
    /// Compute nothing: write the manifests once every shard is captured, else name the
    /// missing units.
    #[arg(long)]
    pub finalize: bool,
}

impl CaptureArgs {
    /// A one-unit (or finalize) capture rather than the whole stage.
    pub fn is_unit(&self) -> bool {
        self.shard.is_some() || self.finalize
    }
}

/// `saepipe evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Evaluate only unit I (= train unit I); writes its metrics.json, not the tables
    /// (`saepipe results` merges them).
    #[arg(long, value_name = "I")]
    pub unit: Option<usize>,
}

/// `saepipe units`.
#[derive(Debug, Args)]
pub struct UnitsArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Print JSON instead of the listing.
    #[arg(long)]
    pub json: bool,
}

/// `saepipe slurm`.
#[derive(Debug, Args)]
pub struct SlurmArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Partition of every job.
    #[arg(long)]
    pub partition: Option<String>,
    /// Account to charge.
    #[arg(long)]
    pub account: Option<String>,
    /// GPUs per task (capture, train, evaluate); 0 requests none.
    #[arg(long, default_value_t = 0)]
    pub gpus_per_task: u32,
    /// CPUs per task.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// Memory per task (sbatch --mem, e.g. 32G).
    #[arg(long)]
    pub mem: Option<String>,
    /// Time limit per task (sbatch --time, e.g. 04:00:00).
    #[arg(long)]
    pub time: Option<String>,
    /// At most this many tasks of one array at once.
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    /// A further sbatch option for every job (repeatable): --sbatch=--qos=high.
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
    /// Where the scripts go (default: <run>/slurm).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The saepipe binary as the compute nodes see it (default: this one).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Also run submit.sh.
    #[arg(long)]
    pub submit: bool,
}

/// `saepipe k8s`.
#[derive(Debug, Args)]
pub struct K8sArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Container image with saepipe in it.
    #[arg(long)]
    pub image: String,
    /// A ReadWriteMany PersistentVolumeClaim for run.data_dir and the hub cache.
    #[arg(long)]
    pub pvc: String,
    /// Where the claim is mounted in every pod.
    #[arg(long, default_value = "/data")]
    pub mount: String,
    /// Namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// nvidia.com/gpu per pod (capture, train, evaluate); 0 requests none.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// Pods of one stage at once.
    #[arg(long, default_value_t = 8)]
    pub parallelism: usize,
    /// Retries of each index before its Job fails.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// The saepipe binary inside the image.
    #[arg(long, default_value = "saepipe")]
    pub binary: String,
    /// Where the manifests go (default: <run>/k8s).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn capture(a: CaptureArgs, progress: ProgressMode) -> Result<ExitCode> {
    let pipeline = a.pipeline.load()?;
    let _lock = RunLock::acquire_shared(&pipeline.run_dir())?;
    let opts = a.pipeline.hub_options(&pipeline);
    let reporter = saepipe::util::progress::reporter(progress);
    let (select, what) = match &a.shard {
        Some(r) => (Select::Units(r.clone()), format!("--shard {r:?}")),
        None => (Select::Finalize, "--finalize".to_string()),
    };
    let _finalize = if a.finalize {
        Some(UnitLock::acquire(
            &pipeline.run_dir().join(".locks/finalize.lock"),
        )?)
    } else {
        None
    };
    saepipe::pipeline::capture::run_select(
        &pipeline,
        &opts,
        a.pipeline.force,
        &select,
        reporter.as_ref(),
    )
    .with_context(|| format!("saepipe capture {} {what}", a.pipeline.pipeline.display()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn train(a: TrainArgs, progress: ProgressMode) -> Result<ExitCode> {
    let pipeline = a.pipeline.load()?;
    let _lock = RunLock::acquire_shared(&pipeline.run_dir())?;
    let reporter = saepipe::util::progress::reporter(progress);
    let i = a.unit.context("invariant: called with --unit")?;
    let n_saes = saepipe::pipeline::train::units(&pipeline, None)?.len();
    let what = || format!("saepipe train {} --unit {i}", a.pipeline.pipeline.display());
    if i == n_saes && pipeline.config.jsae.is_some() {
        // The JSAE unit: every pair of [jsae].
        let _unit = UnitLock::acquire(&pipeline.run_dir().join(".locks/train-jsae.lock"))?;
        let opts = a.pipeline.hub_options(&pipeline);
        saepipe::pipeline::jsae::jsae_stage(&pipeline, &opts, a.pipeline.force, reporter.as_ref())
            .with_context(what)?;
    } else {
        saepipe::pipeline::train::train_unit(&pipeline, i, a.pipeline.force, reporter.as_ref())
            .with_context(what)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn evaluate(a: EvaluateArgs, progress: ProgressMode) -> Result<ExitCode> {
    let pipeline = a.pipeline.load()?;
    let _lock = RunLock::acquire_shared(&pipeline.run_dir())?;
    let opts = a.pipeline.hub_options(&pipeline);
    let reporter = saepipe::util::progress::reporter(progress);
    let i = a.unit.context("invariant: called with --unit")?;
    saepipe::pipeline::evaluate::evaluate_one(
        &pipeline,
        &opts,
        i,
        a.pipeline.force,
        reporter.as_ref(),
    )
    .with_context(|| {
        format!(
            "saepipe evaluate {} --unit {i}",
            a.pipeline.pipeline.display()
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn results(a: PipelineArgs) -> Result<ExitCode> {
    let pipeline = a.load()?;
    let _lock = RunLock::acquire_shared(&pipeline.run_dir())?;
    let _unit = UnitLock::acquire(&pipeline.run_dir().join(".locks/results.lock"))?;
    let table = saepipe::pipeline::evaluate::results_stage(&pipeline)
        .with_context(|| format!("saepipe results {}", a.pipeline.display()))?;
    print!("{table}");
    eprintln!("results: {}", pipeline.run_dir().join("results").display());
    Ok(ExitCode::SUCCESS)
}

fn load_units(
    a: &PipelineArgs,
    progress: ProgressMode,
) -> Result<(saepipe::config::Pipeline, Units)> {
    let pipeline = a.load()?;
    let opts = a.hub_options(&pipeline);
    let reporter = saepipe::util::progress::reporter(progress);
    let units = Units::of(&pipeline, &opts, reporter.as_ref())
        .with_context(|| format!("listing the units of {}", a.pipeline.display()))?;
    Ok((pipeline, units))
}

pub fn units(a: UnitsArgs, progress: ProgressMode) -> Result<ExitCode> {
    let (pipeline, units) = load_units(&a.pipeline, progress)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&units)?);
    } else {
        print!("{}", units.render(&pipeline));
    }
    Ok(ExitCode::SUCCESS)
}

/// How the tasks call saepipe: absolute paths, the same overrides.
fn invocation(a: &PipelineArgs, binary: Option<PathBuf>) -> Result<Invocation> {
    let pipeline = std::fs::canonicalize(&a.pipeline)
        .with_context(|| format!("{}: no such pipeline file", a.pipeline.display()))?;
    let binary = match binary {
        Some(b) => b,
        None => std::env::current_exe().context("finding this saepipe binary; pass --binary")?,
    };
    let cache_dir = match &a.cache_dir {
        Some(c) => Some(std::path::absolute(c).with_context(|| c.display().to_string())?),
        None => None,
    };
    Ok(Invocation {
        binary,
        pipeline,
        sets: a.set.clone(),
        cache_dir,
    })
}

pub fn slurm(a: SlurmArgs, progress: ProgressMode) -> Result<ExitCode> {
    let (pipeline, units) = load_units(&a.pipeline, progress)?;
    let inv = invocation(&a.pipeline, a.binary.clone())?;
    let out = match &a.out {
        Some(o) => o.clone(),
        None => pipeline.run_dir().join("slurm"),
    };
    let out = std::path::absolute(&out).with_context(|| out.display().to_string())?;
    let opts = slurm::SlurmOptions {
        partition: a.partition,
        account: a.account,
        gpus_per_task: a.gpus_per_task,
        cpus_per_task: a.cpus_per_task,
        mem: a.mem,
        time: a.time,
        max_concurrent: a.max_concurrent,
        extra: a.sbatch,
    };
    let w = slurm::write(&out, &units, &inv, &opts, &pipeline.config.run.name)
        .with_context(|| format!("writing the Slurm scripts into {}", out.display()))?;
    eprintln!(
        "{} capture, {} train, {} evaluate task(s); submit with: bash {}",
        units.capture(),
        units.train.len(),
        units.evaluate,
        w.submit.display()
    );
    if a.submit {
        let status = std::process::Command::new("bash")
            .arg(&w.submit)
            .status()
            .with_context(|| format!("running {}", w.submit.display()))?;
        anyhow::ensure!(
            status.success(),
            "{} failed ({status}); is sbatch on PATH and the cluster up (`sinfo`)?",
            w.submit.display()
        );
    } else {
        println!("{}", w.submit.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn k8s(a: K8sArgs, progress: ProgressMode) -> Result<ExitCode> {
    let (pipeline, units) = load_units(&a.pipeline, progress)?;
    let text = std::fs::read_to_string(&a.pipeline.pipeline)
        .with_context(|| format!("reading {}", a.pipeline.pipeline.display()))?;
    let mut inv = invocation(&a.pipeline, Some(PathBuf::from(&a.binary)))?;
    let name = inv
        .pipeline
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline.toml".into());
    inv.pipeline = PathBuf::from(k8s::PIPELINE_MOUNT).join(name);
    let out = match &a.out {
        Some(o) => o.clone(),
        None => pipeline.run_dir().join("k8s"),
    };
    let opts = k8s::K8sOptions {
        image: a.image,
        binary: a.binary,
        namespace: a.namespace,
        pvc: a.pvc,
        mount: a.mount,
        gpus: a.gpus,
        parallelism: a.parallelism,
        retries: a.retries,
    };
    let w = k8s::write(&out, &units, &inv, &opts, &pipeline.config.run.name, &text)
        .with_context(|| format!("writing the Kubernetes manifests into {}", out.display()))?;
    for m in &w.manifests {
        println!("{}", m.display());
    }
    eprintln!("apply in order with: bash {}", w.apply.display());
    Ok(ExitCode::SUCCESS)
}
