//! The `saepipe` binary: parse the command line, set up logging, run, and print any
//! error once with its whole chain (as ripgrep does).

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", render_chain(&err));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes joined with `: ` (what anyhow's `{:#}` prints), skipping a
/// cause whose text its parent's message already contains.
///
/// Decision: many library errors say their cause in their own message
/// (`"{path}: {source}"`) *and* expose it as `source()` (thiserror does so for any field
/// named `source` and for `#[from]`), so the plain chain printed it twice
/// ("… (os error 2): … (os error 2)"). Keeping the cause in the message keeps
/// `to_string()` complete for library callers; the de-duplication belongs here, at the
/// one place that prints a chain, so no variant can bring the repetition back.
fn render_chain(err: &anyhow::Error) -> String {
    let mut chain = err.chain();
    let mut out = chain.next().map(ToString::to_string).unwrap_or_default();
    let mut last = out.clone();
    for cause in chain {
        let text = cause.to_string();
        if text.is_empty() || last.contains(&text) {
            continue;
        }
        out.push_str(": ");
        out.push_str(&text);
        last = text;
    }
    out
}
