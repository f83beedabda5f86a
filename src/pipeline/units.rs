//! The units of a run, addressed by index (issue 15): what one array task of a cluster
//! job runs. `saepipe units <pipeline.toml>` prints them; `saepipe slurm` / `saepipe k8s`
//! size their arrays from them.
//!
//! Stages and their units, each a pure function of the pipeline file and its index:
//!
//! | stage | unit `i` | command |
//! |---|---|---|
//! | capture | shard `i` (train shards, then eval shards), every hookpoint at once | `saepipe capture --shard i` |
//! | finalize | one task: the manifests, once every shard is there | `saepipe capture --finalize` |
//! | train | SAE unit `i` (grid point × hookpoint); then, with `[jsae]`, one unit for every pair | `saepipe train --unit i` |
//! | evaluate | SAE unit `i` | `saepipe evaluate --unit i` |
//! | results | one task: merge every unit's metrics | `saepipe results` |
//!
//! Every unit writes only its own files (tmp + rename, marker last) under its own lock
//! (`util::lock`), so a retried or duplicated task is harmless and a finished one is
//! skipped.

use anyhow::Result;
use serde::Serialize;

use crate::config::Pipeline;
use crate::hub::HubOptions;
use crate::util::progress::Reporter;

/// One SAE unit as listed.
#[derive(Debug, Clone, Serialize)]
pub struct TrainUnit {
    /// Its index (`--unit`).
    pub index: usize,
    /// Grid point id, or `jsae` for the JSAE unit.
    pub point: String,
    /// Hookpoint (empty for the JSAE unit).
    pub hookpoint: String,
    /// Output folder.
    pub dir: String,
    /// Trained with its current config.
    pub trained: bool,
}

/// The units of every stage of a pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct Units {
    /// Capture units of the training split (indices `0..capture_train`).
    pub capture_train: usize,
    /// Capture units of the held-out split (after the training split's).
    pub capture_eval: usize,
    /// Train units (SAE units, then the JSAE unit when there is one).
    pub train: Vec<TrainUnit>,
    /// Evaluate units (= the SAE units).
    pub evaluate: usize,
}

impl Units {
    /// Capture units in all.
    pub fn capture(&self) -> usize {
        self.capture_train + self.capture_eval
    }

    /// The units of `pipeline` (resolves and loads the model to count capture shards).
    pub fn of(pipeline: &Pipeline, opts: &HubOptions, reporter: &dyn Reporter) -> Result<Self> {
        let counts = super::capture::unit_counts(pipeline, opts, reporter)?;
        let saes = super::train::units(pipeline, None)?;
        let mut train: Vec<TrainUnit> = saes
            .iter()
            .enumerate()
            .map(|(index, u)| TrainUnit {
                index,
                point: u.point.id.clone(),
                hookpoint: u.hookpoint.to_string(),
                dir: u.dir.display().to_string(),
                trained: super::train::is_trained(u),
            })
            .collect();
        if pipeline.config.jsae.is_some() {
            train.push(TrainUnit {
                index: saes.len(),
                point: "jsae".into(),
                hookpoint: String::new(),
                dir: pipeline.run_dir().join("jsae").display().to_string(),
                trained: false,
            });
        }
        Ok(Self {
            capture_train: counts.train,
            capture_eval: counts.eval,
            train,
            evaluate: saes.len(),
        })
    }

    /// The listing `saepipe units` prints.
    pub fn render(&self, pipeline: &Pipeline) -> String {
        let c = &pipeline.config;
        let mut out = format!(
            "capture: {} units (saepipe capture --shard I; {} windows of {} tokens per shard, every hookpoint from one forward pass)\n",
            self.capture(),
            (c.capture.shard_tokens / c.data.context_len.max(1) as u64).max(1),
            c.data.context_len
        );
        for i in 0..self.capture() {
            let (split, k) = if i < self.capture_train {
                ("train", i)
            } else {
                ("eval", i - self.capture_train)
            };
            out.push_str(&format!("  {i:>5}  {split} shard {k}\n"));
        }
        out.push_str(
            "finalize: 1 task (saepipe capture --finalize: the manifests, once every shard is there)\n",
        );
        out.push_str(&format!(
            "train: {} units (saepipe train --unit I)\n",
            self.train.len()
        ));
        for u in &self.train {
            let what = if u.hookpoint.is_empty() {
                "every [jsae] pair".to_string()
            } else {
                format!("{} @ {}", u.point, u.hookpoint)
            };
            out.push_str(&format!(
                "  {:>5}  {what:<48} {}{}\n",
                u.index,
                u.dir,
                if u.trained { "  (trained)" } else { "" }
            ));
        }
        out.push_str(&format!(
            "evaluate: {} units (saepipe evaluate --unit I: train unit I)\n",
            self.evaluate
        ));
        out.push_str("results: 1 task (saepipe results)\n");
        out
    }
}

/// Parse a capture unit range: `I`, `I..J` (J excluded) or `I..=J`.
pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>, String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}`: expected I, I..J or I..=J with unit indices"))
    };
    let r = if let Some((a, b)) = s.split_once("..=") {
        num(a)?..num(b)? + 1
    } else if let Some((a, b)) = s.split_once("..") {
        num(a)?..num(b)?
    } else {
        let i = num(s)?;
        i..i + 1
    };
    if r.is_empty() {
        return Err(format!("`{s}` is an empty range"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_in_all_three_forms_and_empty_ones_are_refused() {
        assert_eq!(parse_range("3").unwrap(), 3..4);
        assert_eq!(parse_range("2..5").unwrap(), 2..5);
        assert_eq!(parse_range("2..=5").unwrap(), 2..6);
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("x").is_err());
    }
}
