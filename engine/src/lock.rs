//! One writer at a time: a run holds an exclusive lock on what it writes in its run
//! directory (`.locks/main.lock` for `manifest.json` and the outputs it records, one lock
//! per shard of an array job, whose outputs and manifest files are its own), so that the
//! shards of one plan run side by side while two runs that would write the same records
//! never do. The lock holds who took it (pid, host, since when, command) for the message
//! of a run that finds it taken.
//!
//! In a local run directory the lock is the operating system's (`flock`): a killed run
//! releases it. On S3 it is an object created only if absent (`If-None-Match: *`) and
//! refreshed by a heartbeat (`If-Match` on its ETag); a lock whose heartbeat is older than
//! [`stale_after`] belongs to a dead run and is taken over by a compare-and-swap on its
//! ETag, so that of two runs finding it stale exactly one wins. A run that loses its lock
//! (its heartbeat was overtaken) stops before it writes the manifest again.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::prelude::SessionContext;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::storage::Location;

pub const LOCKS_DIR: &str = ".locks";

/// Who holds a lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub since: String,
    pub command: String,
    /// Last refresh of a lock in an object store (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
}

impl Holder {
    fn me() -> Self {
        Self {
            pid: std::process::id(),
            host: host_name(),
            since: chrono::Utc::now().to_rfc3339(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            heartbeat: None,
        }
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on {}, since {} ({})",
            self.pid, self.host, self.since, self.command
        )
    }

    /// Seconds since the last heartbeat, if it has one that parses.
    fn heartbeat_age(&self) -> Option<f64> {
        let beat = chrono::DateTime::parse_from_rfc3339(self.heartbeat.as_deref()?).ok()?;
        Some((chrono::Utc::now() - beat.with_timezone(&chrono::Utc)).as_seconds_f64())
    }
}

fn taken(run_dir: &str, lock: &str, holder: &str) -> EngineError {
    EngineError::Manifest {
        run_dir: run_dir.to_string(),
        message: format!(
            "another run holds the lock {lock}: {holder}. Wait for it to finish (or stop it); two runs writing the same records would corrupt them"
        ),
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
                    Ok(h) => h.describe(),
                    Err(_) => "a run that has not said who it is yet".into(),
                };
                return Err(taken(
                    &run_dir.display().to_string(),
                    &path.display().to_string(),
                    &holder,
                ));
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

/// How often a lock in an object store is refreshed, and how old its heartbeat must be
/// before another run takes it over.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    pub heartbeat: Duration,
    pub stale_after: Duration,
}

impl Default for LockTiming {
    /// A heartbeat every 30 s; stale after ten missed ones (`ARENAFLOW_LOCK_STALE_SECS`
    /// overrides; hosts' clocks are assumed within a minute of each other, as NTP keeps a
    /// cluster's).
    fn default() -> Self {
        let heartbeat = Duration::from_secs(30);
        let stale_after = std::env::var("ARENAFLOW_LOCK_STALE_SECS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(10 * heartbeat);
        Self {
            heartbeat: heartbeat.min(stale_after / 4),
            stale_after,
        }
    }
}

/// A lock held in an object store (S3): the object `.locks/{name}.lock`, created if
/// absent and refreshed by a heartbeat task; deleted by [`StoreLock::release`].
#[derive(Debug)]
pub struct StoreLock {
    store: Arc<dyn ObjectStore>,
    pub location: Location,
    holder: Holder,
    e_tag: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    timing: LockTiming,
}

impl StoreLock {
    pub async fn acquire(
        ctx: &SessionContext,
        run_dir: &Location,
        name: &str,
        timing: LockTiming,
    ) -> Result<Self> {
        let store = run_dir.store(ctx)?;
        let location = run_dir.join(&format!("{LOCKS_DIR}/{name}.lock"));
        let mut holder = Holder::me();
        holder.heartbeat = Some(holder.since.clone());
        let payload = || -> Result<PutPayload> { Ok(serde_json::to_vec_pretty(&holder)?.into()) };
        let created = store
            .put_opts(&location.path, payload()?, PutMode::Create.into())
            .await;
        let e_tag = match created {
            Ok(result) => result.e_tag,
            Err(object_store::Error::AlreadyExists { .. }) => {
                let found = store.get(&location.path).await?;
                let version = UpdateVersion {
                    e_tag: found.meta.e_tag.clone(),
                    version: found.meta.version.clone(),
                };
                let bytes = found.bytes().await?;
                let other = serde_json::from_slice::<Holder>(&bytes).ok();
                let age = other.as_ref().and_then(Holder::heartbeat_age);
                let stale = timing.stale_after;
                // A lock nobody can read, or whose heartbeat stopped, belongs to a dead run.
                let dead = match age {
                    Some(age) => age > stale.as_secs_f64(),
                    None => other.is_none() && version.e_tag.is_some(),
                };
                if !dead {
                    let who = match (&other, age) {
                        (Some(h), Some(age)) => format!(
                            "{}, last heartbeat {age:.0} s ago; a lock whose heartbeat is older than {} s is taken over",
                            h.describe(),
                            stale.as_secs()
                        ),
                        (Some(h), None) => h.describe(),
                        (None, _) => "a run that has not said who it is yet".into(),
                    };
                    return Err(taken(&run_dir.to_string(), &location.to_string(), &who));
                }
                let options = PutOptions::from(PutMode::Update(version));
                match store.put_opts(&location.path, payload()?, options).await {
                    Ok(result) => {
                        let was = other.map_or("an unreadable lock".into(), |h| h.describe());
                        tracing::warn!(
                            "took over the lock {location} of a run that stopped its heartbeat ({was})"
                        );
                        result.e_tag
                    }
                    Err(object_store::Error::Precondition { .. }) => {
                        return Err(taken(
                            &run_dir.to_string(),
                            &location.to_string(),
                            "another run took this stale lock over at the same moment",
                        ))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let e_tag = Arc::new(Mutex::new(e_tag));
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(beat(
            store.clone(),
            location.clone(),
            holder.clone(),
            e_tag.clone(),
            lost.clone(),
            timing.heartbeat,
        ));
        Ok(Self {
            store,
            location,
            holder,
            e_tag,
            lost,
            heartbeat,
            timing,
        })
    }

    /// Fails if another run took the lock over (this run's heartbeat stalled).
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(EngineError::Invalid(format!(
                "lost the lock {} (its heartbeat stalled for over {} s and another run took it over): stopping before writing the manifest",
                self.location,
                self.timing.stale_after.as_secs()
            )));
        }
        Ok(())
    }

    /// Stops the heartbeat and deletes the lock, if it is still this run's.
    pub async fn release(self) -> Result<()> {
        self.heartbeat.abort();
        let _ = self.heartbeat.await;
        if self.lost.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Only this run writes the lock while it holds it: its ETag says whether it does.
        let current = self.store.head(&self.location.path).await;
        let ours = self.e_tag.lock().map(|e| e.clone()).unwrap_or_default();
        match current {
            Ok(meta) if meta.e_tag == ours => {
                self.store.delete(&self.location.path).await?;
            }
            Ok(_) => tracing::warn!(
                "the lock {} is no longer {}'s: left in place",
                self.location,
                self.holder.describe()
            ),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// Refreshes the lock's heartbeat until aborted; marks it lost when its ETag no longer
/// matches (another run took it over).
async fn beat(
    store: Arc<dyn ObjectStore>,
    location: Location,
    mut holder: Holder,
    e_tag: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicBool>,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        holder.heartbeat = Some(chrono::Utc::now().to_rfc3339());
        let Ok(body) = serde_json::to_vec_pretty(&holder) else {
            continue;
        };
        let version = UpdateVersion {
            e_tag: e_tag.lock().map(|e| e.clone()).unwrap_or_default(),
            version: None,
        };
        let options = PutOptions::from(PutMode::Update(version));
        match store.put_opts(&location.path, body.into(), options).await {
            Ok(result) => {
                if let Ok(mut e) = e_tag.lock() {
                    *e = result.e_tag;
                }
            }
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                tracing::error!("lost the lock {location}: another run took it over");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            // A failed refresh is retried at the next beat; the lock goes stale only after
            // ten of them.
            Err(e) => tracing::warn!("could not refresh the lock {location}: {e}"),
        }
    }
}

/// The lock a run holds on its run directory.
#[derive(Debug)]
pub enum Lock {
    Local(RunLock),
    Store(Box<StoreLock>),
}

impl Lock {
    /// Takes the lock `name` of `run_dir`, local or in an object store.
    pub async fn acquire(ctx: &SessionContext, run_dir: &Location, name: &str) -> Result<Self> {
        if run_dir.is_local() {
            Ok(Self::Local(RunLock::acquire(
                std::path::Path::new(&run_dir.sql()),
                name,
            )?))
        } else {
            Ok(Self::Store(Box::new(
                StoreLock::acquire(ctx, run_dir, name, LockTiming::default()).await?,
            )))
        }
    }

    /// Fails if the lock was lost (object stores only: a local lock cannot be).
    pub fn check(&self) -> Result<()> {
        match self {
            Self::Local(_) => Ok(()),
            Self::Store(lock) => lock.check(),
        }
    }

    pub async fn release(self) -> Result<()> {
        match self {
            Self::Local(lock) => {
                drop(lock);
                Ok(())
            }
            Self::Store(lock) => lock.release().await,
        }
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

    fn in_memory() -> (SessionContext, Location) {
        let ctx = SessionContext::new();
        let url = url::Url::parse("s3://bucket").unwrap();
        ctx.register_object_store(&url, Arc::new(object_store::memory::InMemory::new()));
        (ctx, Location::parse("s3://bucket/runs/r1").unwrap())
    }

    const FAST: LockTiming = LockTiming {
        heartbeat: Duration::from_millis(50),
        stale_after: Duration::from_millis(600),
    };

    #[tokio::test]
    async fn a_live_heartbeat_keeps_a_store_lock_and_a_dead_one_is_taken_over() {
        let (ctx, run_dir) = in_memory();
        let first = StoreLock::acquire(&ctx, &run_dir, "main", FAST)
            .await
            .unwrap();
        // Well past the stale age, the heartbeat keeps it the first run's.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let err = StoreLock::acquire(&ctx, &run_dir, "main", FAST)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("last heartbeat 0 s ago"), "{err}");
        // Shards lock apart.
        let shard = StoreLock::acquire(&ctx, &run_dir, "shard-1-of-2", FAST)
            .await
            .unwrap();
        shard.release().await.unwrap();

        // The first run hangs (its heartbeat stops): once stale, another run takes over.
        first.heartbeat.abort();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let second = StoreLock::acquire(&ctx, &run_dir, "main", FAST)
            .await
            .unwrap();
        // The hung run's release leaves the new holder's lock alone.
        first.release().await.unwrap();
        let err = StoreLock::acquire(&ctx, &run_dir, "main", FAST)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("another run holds the lock"), "{err}");
        second.check().unwrap();
        second.release().await.unwrap();
        StoreLock::acquire(&ctx, &run_dir, "main", FAST)
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_run_whose_lock_was_taken_over_stops() {
        let (ctx, run_dir) = in_memory();
        let first = StoreLock::acquire(&ctx, &run_dir, "main", FAST)
            .await
            .unwrap();
        // Another run overwrites the lock (as a takeover after a stall does).
        let store = run_dir.store(&ctx).unwrap();
        store
            .put(&first.location.path, PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = first.check().unwrap_err().to_string();
        assert!(err.contains("lost the lock"), "{err}");
        first.release().await.unwrap();
        assert!(store
            .head(&run_dir.join(".locks/main.lock").path)
            .await
            .is_ok());
    }
}
