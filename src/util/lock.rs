//! One saepipe process at a time per run folder.
//!
//! Two processes on one run folder would each take the other's in-progress `*.tmp` files
//! for strays and rename half-written files into place. Every stage command therefore holds
//! an exclusive advisory lock (`flock`) on `<run>/.saepipe.lock` for as long as it runs; a
//! second process refuses at once with a message naming the holder (pid, command, start
//! time, written into the file). The kernel drops the lock when its process dies, SIGKILL
//! included, so a crash never leaves a stale lock behind.
//!
//! Decision (issue 15, array tasks): a command that runs one unit (`capture --shard`,
//! `train --unit`, `evaluate --unit`, `results`) holds the run lock *shared* instead, plus
//! an exclusive [`UnitLock`] on that unit alone. So array tasks of different units work on
//! one folder in parallel, a whole-stage command still refuses while any of them runs (and
//! they refuse while it runs), and a duplicated task of the same unit waits for the first
//! to finish, then finds the unit done and skips it: duplicates are harmless.

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
    /// Held shared (a one-unit task) rather than exclusively.
    shared: bool,
}

impl Drop for RunLock {
    /// Empty the holder's line before the kernel releases the lock, so that the next
    /// process refused by a new holder never names this (finished) one.
    fn drop(&mut self) {
        // A shared holder leaves the file to the others still holding it; the next
        // exclusive holder rewrites it.
        if !self.shared {
            let _ = self._file.set_len(0);
        }
    }
}

impl RunLock {
    /// Lock `dir` (created if needed) for this process, or say who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        Self::take(dir, false)
    }

    /// Share `dir` with other one-unit commands (see the module doc); refused while a
    /// whole-stage command holds it.
    pub fn acquire_shared(dir: &Path) -> Result<Self, LockError> {
        Self::take(dir, true)
    }

    fn take(dir: &Path, shared: bool) -> Result<Self, LockError> {
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
        let got = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match got {
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
            "pid {}: {} (since unix time {since}{})",
            std::process::id(),
            args.join(" "),
            if shared {
                "; one of possibly several one-unit tasks"
            } else {
                ""
            }
        );
        if shared {
            // Several one-unit tasks share the lock: each adds its line, none erases another's.
            file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
            file.write_all(format!("{who}\n").as_bytes()).map_err(io)?;
        } else {
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            file.write_all(who.as_bytes()).map_err(io)?;
        }
        file.flush().map_err(io)?;
        Ok(Self {
            _file: file,
            shared,
        })
    }
}

/// An exclusive lock on one unit of a run (a capture shard, an SAE unit, the results),
/// held until dropped. Taking it waits for another holder instead of refusing: the second
/// of two duplicated array tasks then finds the unit done and skips it.
#[derive(Debug)]
pub struct UnitLock {
    _file: File,
}

impl UnitLock {
    /// Lock `path` (its folder created if needed), waiting while another process holds it.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                tracing::info!(
                    "{} is held by another task of the same unit; waiting for it",
                    path.display()
                );
                file.lock().map_err(io)?;
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
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

    #[test]
    fn shared_holders_coexist_and_exclude_a_whole_stage_lock() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunLock::acquire_shared(dir.path()).unwrap();
        let b = RunLock::acquire_shared(dir.path()).unwrap();
        assert!(matches!(
            RunLock::acquire(dir.path()),
            Err(LockError::Busy { .. })
        ));
        drop((a, b));
        let whole = RunLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            RunLock::acquire_shared(dir.path()),
            Err(LockError::Busy { .. })
        ));
        drop(whole);
    }

    #[test]
    fn a_unit_lock_waits_for_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/unit.lock");
        let first = UnitLock::acquire(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            let _second = UnitLock::acquire(&p2).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }
}
