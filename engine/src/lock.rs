//! One writer at a time: a run holds an exclusive lock on what it writes in a local run
//! directory (`.locks/main.lock` for `manifest.json` and the outputs it records, one lock
//! per shard of an array job, whose outputs and manifest files are its own), so that the
//! shards of one plan run side by side while two runs that would write the same records
//! never do. The lock is the operating system's (`flock`): a killed run releases it. The
//! file holds who took it (pid, host, since when, command) for the message of a run that
//! finds it taken.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

pub const LOCKS_DIR: &str = ".locks";

/// Who holds a lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub since: String,
    pub command: String,
}

impl Holder {
    fn me() -> Self {
        Self {
            pid: std::process::id(),
            host: host_name(),
            since: chrono::Utc::now().to_rfc3339(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown host".into())
}

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Takes the lock `name` (`main`, or a shard's writer name) of the local run directory
    /// `run_dir`, or fails naming the run that holds it.
    pub fn acquire(run_dir: &std::path::Path, name: &str) -> Result<Self> {
        let dir = run_dir.join(LOCKS_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{name}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match serde_json::from_str::<Holder>(&text) {
                    Ok(h) => format!(
                        "pid {} on {}, since {} ({})",
                        h.pid, h.host, h.since, h.command
                    ),
                    Err(_) => "a run that has not said who it is yet".into(),
                };
                return Err(EngineError::Manifest {
                    run_dir: run_dir.display().to_string(),
                    message: format!(
                        "another run holds the lock {}: {holder}. Wait for it to finish (or stop it); two runs writing the same records would corrupt them",
                        path.display()
                    ),
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(EngineError::Invalid(format!("{}: {e}", path.display())))
            }
        }
        let holder = serde_json::to_vec_pretty(&Holder::me())?;
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(&holder)?;
        file.flush()?;
        Ok(Self { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path(), "main").unwrap();
        let err = RunLock::acquire(dir.path(), "main")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("since"),
            "{err}"
        );
        // Shards lock apart from the main writer and from each other.
        let _shard = RunLock::acquire(dir.path(), "shard-0-of-2").unwrap();
        drop(first);
        RunLock::acquire(dir.path(), "main").unwrap();
    }
}
