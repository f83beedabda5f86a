//! One saepipe process at a time per run folder.
//!
//! Two processes on one run folder would each take the other's in-progress `*.tmp` files
//! for strays and rename half-written files into place. Every stage command therefore holds
//! an exclusive advisory lock (`flock`) on `<run>/.saepipe.lock` for as long as it runs; a
//! second process refuses at once with a message naming the holder (pid, command, start
//! time, written into the file). The kernel drops the lock when its process dies, SIGKILL
//! included, so a crash never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".saepipe.lock";

/// Why the run folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{dir} is in use by another saepipe process ({holder}); wait for it to finish (or stop it) and run this again: two processes on one run folder would overwrite each other's files")]
    Busy {
        /// The run folder.
        dir: PathBuf,
        /// What the holder wrote into the lock file.
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("{path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Reads of the holder's line, 20 ms apart, before a busy lock is reported without it.
const HOLDER_WAIT_TRIES: usize = 25;

/// An exclusive lock on a run folder, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl Drop for RunLock {
    /// Empty the holder's line before the kernel releases the lock, so that the next
    /// process refused by a new holder never names this (finished) one.
    fn drop(&mut self) {
        let _ = self._file.set_len(0);
    }
}

impl RunLock {
    /// Lock `dir` (created if needed) for this process, or say who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // The holder writes who it is just after it locks (and empties the file
                // before it unlocks): give it a moment rather than report "holder unknown".
                let mut holder = String::new();
                for _ in 0..HOLDER_WAIT_TRIES {
                    holder.clear();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut holder);
                    if !holder.trim().is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let holder = holder.trim();
                return Err(LockError::Busy {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "holder unknown".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let args: Vec<String> = std::env::args().collect();
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let who = format!(
            "pid {}: {} (since unix time {since})",
            std::process::id(),
            args.join(" ")
        );
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(who.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, LockError::Busy { .. })
                && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
