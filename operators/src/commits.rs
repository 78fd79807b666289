//! Batch-by-batch commits of a model operator: `part-NNNNNN.parquet` files in a resume
//! folder, each written as `.partial` and renamed once complete, so that after kill -9 a
//! part is either whole or absent. A rerun reads the parts back and computes only what is
//! missing; a part damaged after the fact (it does not read) is dropped with a warning, and
//! its rows are computed again.

use std::fs::File;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ArrowWriter;

use crate::error::{OperatorError, Result};

pub struct PartStore {
    dir: PathBuf,
    schema: SchemaRef,
    next: usize,
}

fn part_number(name: &str) -> Option<usize> {
    name.strip_prefix("part-")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

impl PartStore {
    /// Opens (creating) `dir` and reads back every committed part; leftovers of a write
    /// that was cut off are removed. A part whose schema differs is an error: the folder
    /// belongs to another pass.
    pub fn open(dir: &Path, schema: SchemaRef) -> Result<(Self, Vec<RecordBatch>)> {
        std::fs::create_dir_all(dir).map_err(|e| OperatorError::io(dir, e))?;
        let mut numbered = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| OperatorError::io(dir, e))? {
            let entry = entry.map_err(|e| OperatorError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".partial") {
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(n) = part_number(&name) {
                numbered.push((n, entry.path()));
            }
        }
        numbered.sort();
        let mut batches = Vec::new();
        for (_, path) in &numbered {
            match read_part(path, &schema)? {
                Ok(part) => batches.extend(part),
                Err(damage) => {
                    // A part cut short (a disk filled, a copy broke off): its rows are
                    // computed again.
                    eprintln!(
                        "arenaflow: dropped the damaged part {} ({damage}); its rows are computed again",
                        path.display()
                    );
                    std::fs::remove_file(path).map_err(|e| OperatorError::io(path, e))?;
                }
            }
        }
        let next = numbered.last().map_or(0, |(n, _)| n + 1);
        Ok((
            Self {
                dir: dir.to_path_buf(),
                schema,
                next,
            },
            batches,
        ))
    }

    /// Commits one batch: written in full, synced, then renamed into place.
    pub fn commit(&mut self, batch: &RecordBatch) -> Result<()> {
        let path = self.dir.join(format!("part-{:06}.parquet", self.next));
        let partial = self
            .dir
            .join(format!("part-{:06}.parquet.partial", self.next));
        let write = || -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let file = File::create(&partial)?;
            let mut writer = ArrowWriter::try_new(file, self.schema.clone(), None)?;
            writer.write(batch)?;
            let file = writer.into_inner()?;
            file.sync_all()?;
            std::fs::rename(&partial, &path)?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&partial);
            return Err(OperatorError::file(&path, format!("cannot commit: {e}")));
        }
        self.next += 1;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The batches of one committed part; the inner error says why the part is damaged (it
/// does not read as Parquet). A whole part of another pass is an error.
fn read_part(
    path: &Path,
    schema: &SchemaRef,
) -> Result<std::result::Result<Vec<RecordBatch>, String>> {
    let file = File::open(path).map_err(|e| OperatorError::io(path, e))?;
    let reader = match ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()) {
        Ok(reader) => reader,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut batches = Vec::new();
    for batch in reader {
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => return Ok(Err(e.to_string())),
        };
        if batch.schema().fields() != schema.fields() {
            return Err(OperatorError::file(
                path,
                format!(
                    "a part of another pass (its columns: {:?}); remove the folder to start over",
                    batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                ),
            ));
        }
        batches.push(
            batch
                .with_schema(schema.clone())
                .map_err(|e| OperatorError::file(path, format!("part schema: {e}")))?,
        );
    }
    Ok(Ok(batches))
}
