//! Progress reporting. Library code calls a [`Reporter`]; the binary decides between
//! progress bars, JSON lines and silence (`--progress auto|bars|jsonl|off`), as uv's
//! reporters and tokenizers' `ProgressFormat` do.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where progress goes.
pub trait Reporter: Send + Sync {
    /// A task named `name` starts; `total` units (tokens, bytes, steps) if known.
    fn start(&self, name: &str, total: Option<u64>) -> Box<dyn Progress>;
    /// A one-line message for the user (printed without tearing any bar).
    fn message(&self, msg: &str);
}

/// One running task.
pub trait Progress: Send + Sync {
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// Replace the short status text shown beside the bar (e.g. the current loss).
    fn set_message(&self, msg: String);
    /// Set the absolute position (e.g. when resuming).
    fn set_position(&self, pos: u64);
    /// The task is finished.
    fn finish(&self);
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ProgressMode {
    /// Bars on a terminal, nothing otherwise.
    #[default]
    Auto,
    /// indicatif bars on stderr.
    Bars,
    /// One JSON object per update on stderr, for CI and notebooks.
    Jsonl,
    /// Nothing.
    Off,
}

/// Build the reporter for `mode`.
pub fn reporter(mode: ProgressMode) -> Arc<dyn Reporter> {
    match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => Arc::new(Bars::default()),
        ProgressMode::Auto | ProgressMode::Off => Arc::new(Silent),
        ProgressMode::Bars => Arc::new(Bars::default()),
        ProgressMode::Jsonl => Arc::new(JsonLines),
    }
}

/// Reports nothing.
pub struct Silent;

struct SilentProgress;

impl Progress for SilentProgress {
    fn advance(&self, _n: u64) {}
    fn set_message(&self, _msg: String) {}
    fn set_position(&self, _pos: u64) {}
    fn finish(&self) {}
}

impl Reporter for Silent {
    fn start(&self, _name: &str, _total: Option<u64>) -> Box<dyn Progress> {
        Box::new(SilentProgress)
    }
    fn message(&self, msg: &str) {
        tracing::info!("{msg}");
    }
}

/// indicatif progress bars, one per running task.
#[derive(Default)]
pub struct Bars {
    multi: MultiProgress,
}

impl Reporter for Bars {
    fn start(&self, name: &str, total: Option<u64>) -> Box<dyn Progress> {
        let bar = match total {
            Some(t) => {
                let bar = ProgressBar::new(t);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>12.bold} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta} {msg}",
                    )
                    .expect("invariant: the template is a literal")
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>12.bold} {spinner} {human_pos} {msg}")
                        .expect("invariant: the template is a literal"),
                );
                bar
            }
        };
        let bar = self.multi.add(bar);
        bar.set_prefix(name.to_string());
        Box::new(bar)
    }
    fn message(&self, msg: &str) {
        let _ = self.multi.println(msg);
    }
}

impl Progress for ProgressBar {
    fn advance(&self, n: u64) {
        self.inc(n);
    }
    fn set_message(&self, msg: String) {
        ProgressBar::set_message(self, msg);
    }
    fn set_position(&self, pos: u64) {
        ProgressBar::set_position(self, pos);
    }
    fn finish(&self) {
        ProgressBar::finish(self);
    }
}

/// One JSON object per update on stderr.
pub struct JsonLines;

struct JsonProgress {
    name: String,
    total: Option<u64>,
    state: Mutex<(u64, Instant)>,
}

impl JsonProgress {
    fn emit(&self, pos: u64, event: &str, msg: Option<&str>) {
        let line = serde_json::json!({
            "task": self.name, "event": event, "pos": pos, "total": self.total, "msg": msg,
        });
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

impl Progress for JsonProgress {
    fn advance(&self, n: u64) {
        let mut st = self
            .state
            .lock()
            .expect("invariant: no panics while holding the lock");
        st.0 += n;
        // At most one line a second: a progress log, not a trace.
        if st.1.elapsed().as_secs_f32() >= 1.0 {
            st.1 = Instant::now();
            self.emit(st.0, "progress", None);
        }
    }
    fn set_message(&self, msg: String) {
        let pos = self.state.lock().map(|s| s.0).unwrap_or(0);
        self.emit(pos, "message", Some(&msg));
    }
    fn set_position(&self, pos: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = pos;
        }
    }
    fn finish(&self) {
        let pos = self.state.lock().map(|s| s.0).unwrap_or(0);
        self.emit(pos, "finish", None);
    }
}

impl Reporter for JsonLines {
    fn start(&self, name: &str, total: Option<u64>) -> Box<dyn Progress> {
        let p = JsonProgress {
            name: name.to_string(),
            total,
            state: Mutex::new((0, Instant::now())),
        };
        p.emit(0, "start", None);
        Box::new(p)
    }
    fn message(&self, msg: &str) {
        let line = serde_json::json!({ "event": "message", "msg": msg });
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}
