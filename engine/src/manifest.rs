//! The run manifest (`manifest.json` in the run directory): every output a plan wrote
//! there, with its row count, id coverage, and the hashes of its plan, parameters and
//! inputs. An output is complete only once its record says so.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::prelude::SessionContext;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::storage::{objects_under, InputFile, Location, OutputFile};

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
    /// The files written, with their sizes and content hashes: what "up to date" checks.
    #[serde(default)]
    pub files: Vec<OutputFile>,
    /// Rows the readers left out under `on_error = 'skip'`, by input.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_rows: BTreeMap<String, usize>,
    /// Hash of stage, output path, plan, parameters and inputs: equal means up to date.
    pub fingerprint: String,
    pub written_at: String,
    /// Figures of the model operators that produced it (rows, tokens, padding, tokens/s,
    /// peak memory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<serde_json::Value>,
}

/// Where the shards of an array job record their outputs: one file each, so that
/// concurrent tasks never overwrite each other's records.
pub const SHARD_MANIFESTS: &str = "manifest.d";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// By path relative to the run directory.
    pub outputs: BTreeMap<String, OutputRecord>,
    /// The file this process writes under `manifest.d/` (a shard of an array job), or
    /// None for `manifest.json` itself.
    #[serde(skip)]
    writer: Option<String>,
    /// The outputs this writer's file holds.
    #[serde(skip)]
    owned: BTreeSet<String>,
}

impl Manifest {
    /// The run directory's records: `manifest.json` and every shard's file under
    /// `manifest.d/` (the latest record of an output wins). With a `writer`, saves go to
    /// `manifest.d/{writer}.json` and hold only what this writer recorded.
    pub async fn load(
        ctx: &SessionContext,
        run_dir: &Location,
        writer: Option<String>,
    ) -> Result<Self> {
        let store = run_dir.store(ctx)?;
        let mut manifest = Self {
            version: 1,
            ..Default::default()
        };
        let mut files = vec![run_dir.join(MANIFEST_FILE).path];
        let shards = run_dir.join(SHARD_MANIFESTS);
        for object in objects_under(store.as_ref(), &shards).await? {
            if object.location.as_ref().ends_with(".json") {
                files.push(object.location);
            }
        }
        let own = writer
            .as_ref()
            .map(|w| run_dir.join(&format!("{SHARD_MANIFESTS}/{w}.json")).path);
        for path in files {
            let bytes = match store.get(&path).await {
                Ok(result) => result.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let part: Manifest =
                serde_json::from_slice(&bytes).map_err(|e| EngineError::Manifest {
                    run_dir: run_dir.to_string(),
                    message: format!(
                        "{path} is not a valid manifest ({e}). To recover, move it aside (e.g. `mv {path} {path}.bad`) and run again with --force: the outputs it recorded are made again"
                    ),
                })?;
            let mine = own.as_ref() == Some(&path);
            for (key, record) in part.outputs {
                if mine {
                    manifest.owned.insert(key.clone());
                }
                match manifest.outputs.get(&key) {
                    Some(seen) if seen.written_at > record.written_at => {}
                    _ => {
                        manifest.outputs.insert(key, record);
                    }
                }
            }
        }
        manifest.writer = writer;
        Ok(manifest)
    }

    /// Records an output (saved with the next `save`).
    pub fn record(&mut self, key: &str, record: OutputRecord) {
        self.owned.insert(key.to_string());
        self.outputs.insert(key.to_string(), record);
    }

    /// Writes this writer's file in one atomic put: the records this process made over
    /// the file as it is now (another process's records in it are kept).
    pub async fn save(&self, ctx: &SessionContext, run_dir: &Location) -> Result<()> {
        let store = run_dir.store(ctx)?;
        let path = match &self.writer {
            None => run_dir.join(MANIFEST_FILE).path,
            Some(writer) => {
                run_dir
                    .join(&format!("{SHARD_MANIFESTS}/{writer}.json"))
                    .path
            }
        };
        let mut file = match store.get(&path).await {
            Ok(result) => {
                let bytes = result.bytes().await?;
                serde_json::from_slice::<Manifest>(&bytes).map_err(|e| EngineError::Manifest {
                    run_dir: run_dir.to_string(),
                    message: format!("{path} is not a valid manifest ({e})"),
                })?
            }
            Err(object_store::Error::NotFound { .. }) => Manifest::default(),
            Err(e) => return Err(e.into()),
        };
        file.version = self.version;
        for key in &self.owned {
            if let Some(record) = self.outputs.get(key) {
                file.outputs.insert(key.clone(), record.clone());
            }
        }
        store
            .put(&path, PutPayload::from(serde_json::to_vec_pretty(&file)?))
            .await?;
        Ok(())
    }
}
