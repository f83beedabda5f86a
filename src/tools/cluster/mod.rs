//! Scale-out on a cluster's own scheduler (issue 15): `saepipe slurm` writes job arrays
//! chained with `--dependency=afterok`, `saepipe k8s` writes Indexed Jobs. Both run the
//! same unit commands ([`crate::pipeline::units`]), one array task per unit:
//!
//! ```text
//! capture --shard I  →  capture --finalize  →  train --unit I  →  evaluate --unit I  →  results
//! ```
//!
//! Decision: a stage with no units (a `[synthetic]` pipeline captures nothing) is left
//! out of the chain, and the next stage depends on the one before it.

pub mod k8s;
pub mod slurm;

use std::path::PathBuf;

use crate::pipeline::units::Units;

/// How every task calls saepipe: the binary, the pipeline file and its overrides.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The saepipe binary as the tasks see it.
    pub binary: PathBuf,
    /// The pipeline file as the tasks see it.
    pub pipeline: PathBuf,
    /// `--set KEY=VALUE` overrides, passed to every task.
    pub sets: Vec<String>,
    /// Hub cache folder (`--cache-dir`), passed to every task.
    pub cache_dir: Option<PathBuf>,
}

impl Invocation {
    /// The arguments after the binary for one stage command (`stage` like `train`, `unit`
    /// the extra arguments such as `--unit`, `<index>`).
    pub fn args(&self, stage: &str, unit: &[&str]) -> Vec<String> {
        let mut a = vec![
            "--progress".to_string(),
            "off".to_string(),
            stage.to_string(),
            self.pipeline.display().to_string(),
        ];
        for s in &self.sets {
            a.push("--set".into());
            a.push(s.clone());
        }
        if let Some(c) = &self.cache_dir {
            a.push("--cache-dir".into());
            a.push(c.display().to_string());
        }
        a.extend(unit.iter().map(|s| s.to_string()));
        a
    }
}

/// One stage of the chain: its name, the task count and the unit flag (`None`: one task
/// without an index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// `capture`, `finalize`, `train`, `evaluate`, `results`.
    pub name: &'static str,
    /// The saepipe subcommand.
    pub command: &'static str,
    /// Tasks (array size), 1 for the single-task stages.
    pub tasks: usize,
    /// The flag that takes the task index (`--shard`, `--unit`), or extra fixed flags.
    pub index_flag: Option<&'static str>,
    /// Fixed extra arguments (`--finalize`).
    pub extra: &'static [&'static str],
}

/// The stages of a run in order, empty ones left out.
pub fn stages(units: &Units) -> Vec<Stage> {
    let all = [
        Stage {
            name: "capture",
            command: "capture",
            tasks: units.capture(),
            index_flag: Some("--shard"),
            extra: &[],
        },
        Stage {
            name: "finalize",
            command: "capture",
            tasks: usize::from(units.capture() > 0),
            index_flag: None,
            extra: &["--finalize"],
        },
        Stage {
            name: "train",
            command: "train",
            tasks: units.train.len(),
            index_flag: Some("--unit"),
            extra: &[],
        },
        Stage {
            name: "evaluate",
            command: "evaluate",
            tasks: units.evaluate,
            index_flag: Some("--unit"),
            extra: &[],
        },
        Stage {
            name: "results",
            command: "results",
            tasks: 1,
            index_flag: None,
            extra: &[],
        },
    ];
    all.into_iter().filter(|s| s.tasks > 0).collect()
}

/// `s` quoted for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_keeps_plain_words_and_escapes_quotes() {
        assert_eq!(sh_quote("a/b.toml"), "a/b.toml");
        assert_eq!(sh_quote("data.files=[\"x\"]"), "'data.files=[\"x\"]'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
