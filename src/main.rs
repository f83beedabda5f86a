//! The `saepipe` binary: parse the command line, set up logging, run, and print any
//! error once with its whole chain (as ripgrep does).

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
