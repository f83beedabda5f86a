//! `saepipe bench <what> ...`: throughput and peak memory, printed as a table.
//!
//! Implements the `bench` command of `../shared/specs/pipeline.md` §1. Each benchmark is a
//! submodule with its own clap arguments, parsed from the words after `<what>`; add one by
//! adding a module and an arm to [`run`]. Timings are printed, never asserted in tests.

pub mod capture;
pub mod forward;
pub mod gpu;
pub mod pam;
pub mod train;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No benchmark of that name.
    #[error("unknown benchmark '{0}'; available: forward, capture, train, pam, gpu")]
    Unknown(String),
    /// Bad arguments (the message is clap's usage text).
    #[error("{0}")]
    Usage(String),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(Box<crate::models::ModelError>),
    /// A forward pass failed.
    #[error("forward pass failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The training benchmark failed.
    #[error("{0}")]
    Train(String),
    /// A capture benchmark case failed.
    #[error("capture benchmark: {0}")]
    Capture(String),
    /// The reference Python benchmark failed.
    #[error("reference benchmark ({cmd}) failed: {detail}")]
    Reference { cmd: String, detail: String },
}

impl From<crate::models::ModelError> for BenchError {
    fn from(e: crate::models::ModelError) -> Self {
        BenchError::Model(Box::new(e))
    }
}

/// Run benchmark `what` with its command-line `args`, printing its table to stdout.
pub fn run(what: &str, args: &[String]) -> Result<(), BenchError> {
    match what {
        "forward" => forward::run_cli(args),
        "capture" => capture::run_cli(args),
        "gpu" => gpu::run_cli(args),
        "train" => {
            let table = train::run(args).map_err(|e| BenchError::Train(e.to_string()))?;
            print!("{table}");
            Ok(())
        }
        "pam" => {
            print!("{}", pam::run(args)?);
            Ok(())
        }
        other => Err(BenchError::Unknown(other.to_string())),
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` of /proc/self/status), when
/// the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_positive_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_bytes().unwrap() > 0);
        }
    }

    #[test]
    fn unknown_benchmark_names_the_choices() {
        let e = super::run("nope", &[]).unwrap_err();
        assert!(e
            .to_string()
            .contains("available: forward, capture, train, pam, gpu"));
    }
}
