//! The input files a plan run reads, collected while its statements are planned.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inputs {
    locations: Vec<String>,
    skipped_rows: BTreeMap<String, usize>,
}

/// Shared between the table functions (which record what they open) and the runner.
#[derive(Debug, Clone, Default)]
pub struct InputTracker(Arc<Mutex<Inputs>>);

impl InputTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inputs> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn record(&self, location: &str) {
        let mut inputs = self.lock();
        if !inputs.locations.iter().any(|l| l == location) {
            inputs.locations.push(location.to_string());
        }
    }

    pub fn record_skipped(&self, location: &str, rows: usize) {
        if rows > 0 {
            self.lock().skipped_rows.insert(location.to_string(), rows);
        }
    }

    /// Every input location seen so far, in the order first seen.
    pub fn locations(&self) -> Vec<String> {
        self.lock().locations.clone()
    }

    /// Rows left out under a skip policy, by input.
    pub fn skipped_rows(&self) -> BTreeMap<String, usize> {
        self.lock().skipped_rows.clone()
    }
}
