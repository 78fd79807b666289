//! Per-run state that the plan runner and the operators share, as typed `SessionConfig`
//! extensions: the table functions find them through `TableFunctionArgs::session()`, the
//! operators through their `TaskContext`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::execution::TaskContext;
use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Inputs {
    locations: Vec<String>,
    skipped_rows: BTreeMap<String, usize>,
}

/// The input files a run reads, recorded by the table functions while statements are
/// planned (their hashes key the outputs), and the rows readers left out under a skip
/// policy. One per session; clones share it.
#[derive(Debug, Clone, Default)]
pub struct RunInputs(Arc<Mutex<Inputs>>);

impl RunInputs {
    pub fn record(&self, location: &str) {
        let mut inputs = self.0.lock();
        if !inputs.locations.iter().any(|l| l == location) {
            inputs.locations.push(location.to_string());
        }
    }

    pub fn record_skipped(&self, location: &str, rows: usize) {
        if rows > 0 {
            self.0
                .lock()
                .skipped_rows
                .insert(location.to_string(), rows);
        }
    }

    /// Every input location seen so far, in the order first seen.
    pub fn locations(&self) -> Vec<String> {
        self.0.lock().locations.clone()
    }

    /// Rows left out under a skip policy, by input.
    pub fn skipped_rows(&self) -> BTreeMap<String, usize> {
        self.0.lock().skipped_rows.clone()
    }
}

/// The managed output a statement writes, set by the runner for the statement's
/// execution: where model operators commit batch by batch (so that a rerun after kill -9
/// goes on where it stopped), and the staging folder that model artifacts (adapters,
/// merged models) go into, to be recorded and moved with the output. Absent outside a
/// managed `COPY`: nothing is committed and nothing resumes.
#[derive(Debug, Clone)]
pub struct ManagedOutput {
    pub resume_dir: PathBuf,
    pub artifact_dir: String,
}

impl ManagedOutput {
    /// The managed output of the statement `context` runs, if any.
    pub fn of(context: &TaskContext) -> Option<Arc<Self>> {
        context.session_config().get_extension::<Self>()
    }

    /// The local folder an operator that writes `what` (e.g. "an averaged adapter") puts it
    /// in: an error outside a managed `COPY` or where the run directory is not local.
    pub fn local_artifact_dir(
        context: &TaskContext,
        operator: &str,
        what: &str,
    ) -> datafusion::common::Result<PathBuf> {
        let Some(managed) = Self::of(context) else {
            return datafusion::common::exec_err!(
                "{operator} writes {what}: run it in a COPY into the run directory"
            );
        };
        if managed.artifact_dir.contains("://") {
            return datafusion::common::exec_err!(
                "{operator}: {what} is written to a local folder; {} is not one",
                managed.artifact_dir
            );
        }
        Ok(PathBuf::from(&managed.artifact_dir))
    }
}
