//! The run manifest (`manifest.json` in the run directory): every output a plan wrote
//! there, with its row count, id coverage, and the hashes of its plan, parameters and
//! inputs. An output is complete only once its record says so.

use std::collections::BTreeMap;

use datafusion::prelude::SessionContext;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::storage::{InputFile, Location};

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStatus {
    /// Being moved into place; not to be trusted.
    Writing,
    Complete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub status: OutputStatus,
    pub stage: String,
    pub plan: String,
    pub line: usize,
    pub format: String,
    pub params: BTreeMap<String, String>,
    pub rows: u64,
    /// Distinct values of the `id` column; absent when the output has none.
    pub distinct_ids: Option<u64>,
    pub plan_sha256: String,
    pub params_sha256: String,
    pub inputs: Vec<InputFile>,
    /// Rows the readers left out under `on_error = 'skip'`, by input.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_rows: BTreeMap<String, usize>,
    /// Hash of stage, output path, plan, parameters and inputs: equal means up to date.
    pub fingerprint: String,
    pub written_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// By path relative to the run directory.
    pub outputs: BTreeMap<String, OutputRecord>,
}

impl Manifest {
    pub async fn load(ctx: &SessionContext, run_dir: &Location) -> Result<Self> {
        let store = run_dir.store(ctx)?;
        let path = run_dir.join(MANIFEST_FILE).path;
        match store.get(&path).await {
            Ok(result) => {
                let bytes = result.bytes().await?;
                serde_json::from_slice(&bytes).map_err(|e| EngineError::Manifest {
                    run_dir: run_dir.to_string(),
                    message: format!("{MANIFEST_FILE} is not a valid manifest: {e}"),
                })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(Self {
                version: 1,
                outputs: BTreeMap::new(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the whole manifest in one atomic put.
    pub async fn save(&self, ctx: &SessionContext, run_dir: &Location) -> Result<()> {
        let store = run_dir.store(ctx)?;
        let json = serde_json::to_vec_pretty(self)?;
        store
            .put(&run_dir.join(MANIFEST_FILE).path, PutPayload::from(json))
            .await?;
        Ok(())
    }
}
