//! The one-unit commands and the cluster generators (issue 15): `capture --shard/--finalize`,
//! `train --unit`, `evaluate --unit`, `units`, `results`, `slurm`, `k8s`. Parsing and
//! locking only; the work lives in `saepipe::pipeline` and `saepipe::tools::cluster`.
//!
//! Locks: a one-unit command holds the run folder's lock shared and its unit's lock
//! exclusively (`saepipe::util::lock`), so array tasks of different units run side by side
//! and a whole-stage command refuses while any runs.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use saepipe::capture::Select;
use saepipe::pipeline::units::{parse_range, Units};
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
