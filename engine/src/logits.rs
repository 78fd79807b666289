//! `arenaflow logits`: a model's 3 logits for rows of token ids, from Parquet to Parquet.
//! The check from outside the test suite: the same path the operators use.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arenaflow_operators::teacher::{start_pass, ForwardStats, Teacher, TeacherSettings};
use datafusion::arrow::array::{
    Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Schema};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ArrowWriter;

use crate::error::{EngineError, Result};

pub struct LogitsOptions {
    pub teacher: TeacherSettings,
    pub input: PathBuf,
    pub output: PathBuf,
    /// Run the first batch once, untimed, before the pass (benchmarks).
    pub warmup: bool,
    /// Time each section of the forward pass (synchronising the device around each).
    pub profile: bool,
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {message}", path.display()))
}

/// Reads `id` and `input_ids` from a Parquet file, checking every row.
pub fn read_token_rows(path: &Path, vocab_size: usize) -> Result<(Vec<String>, Vec<Vec<u32>>)> {
    let file = File::open(path).map_err(|e| invalid(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| invalid(path, format!("not a Parquet file: {e}")))?
        .build()
        .map_err(|e| invalid(path, e))?;
    let (mut ids, mut rows) = (Vec::new(), Vec::new());
    for batch in reader {
        let batch = batch.map_err(|e| invalid(path, e))?;
        let id = batch
            .column_by_name("id")
            .ok_or_else(|| invalid(path, "no column id"))?;
        let id = datafusion::arrow::compute::cast(id, &DataType::Utf8)
            .map_err(|e| invalid(path, format!("column id: {e}")))?;
        let id = id.as_string::<i32>();
        let tokens = batch
            .column_by_name("input_ids")
            .ok_or_else(|| invalid(path, "no column input_ids"))?;
        let list_type = DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true)));
        let tokens = datafusion::arrow::compute::cast(tokens, &list_type).map_err(|e| {
            invalid(
                path,
                format!("column input_ids is not a list of integers: {e}"),
            )
        })?;
        let tokens = tokens.as_list::<i32>();
        for r in 0..batch.num_rows() {
            let row = rows.len() + 1;
            if id.is_null(r) {
                return Err(invalid(path, format!("row {row}, column id: null")));
            }
            let at = |m: String| {
                invalid(
                    path,
                    format!("row {row} (id {}), column input_ids: {m}", id.value(r)),
                )
            };
            if tokens.is_null(r) {
                return Err(at("null".into()));
            }
            let values = tokens.value(r);
            let values = values.as_primitive::<Int32Type>();
            if values.is_empty() {
                return Err(at("no tokens".into()));
            }
            let mut row_ids = Vec::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                match v {
                    Some(t) if t >= 0 && (t as usize) < vocab_size => row_ids.push(t as u32),
                    Some(t) => {
                        return Err(at(format!(
                            "token {t} at position {i} is outside the vocabulary (0..{vocab_size})"
                        )))
                    }
                    None => return Err(at(format!("null token at position {i}"))),
                }
            }
            ids.push(id.value(r).to_string());
            rows.push(row_ids);
        }
    }
    Ok((ids, rows))
}

/// Runs the model over every row, batched by length under a token budget (the batches of
/// the `teacher_forward` operator), and writes `id`, `logits` (3 x f32) in input order; the
/// file appears only when complete. The figures exclude loading (and the warm-up batch).
pub fn run_logits(opts: &LogitsOptions) -> Result<ForwardStats> {
    let teacher = Teacher::load(&opts.teacher).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let (ids, rows) = read_token_rows(&opts.input, teacher.vocab_size())?;
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let batches = teacher.plan(&lengths);
    let forward = |members: &[usize]| {
        let slices: Vec<&[u32]> = members.iter().map(|&i| rows[i].as_slice()).collect();
        teacher
            .forward(&slices)
            .map_err(|e| EngineError::Invalid(e.to_string()))
    };
    if opts.warmup {
        if let Some(first) = batches.first() {
            forward(first)?;
        }
    }
    arenaflow_operators::teacher::profile::take();
    arenaflow_operators::teacher::profile::enable(opts.profile);
    let started = start_pass();
    let mut stats = ForwardStats {
        operator: "logits".into(),
        model: opts.teacher.model.clone(),
        dtype: opts.teacher.dtype.clone(),
        ..Default::default()
    };
    // Three logits per row, in input order.
    let mut flat = vec![0f32; 3 * rows.len()];
    for members in &batches {
        for (&i, l) in members.iter().zip(forward(members)?) {
            flat[3 * i..3 * i + 3].copy_from_slice(&l);
        }
        let longest = members.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        stats.tokens += members.iter().map(|&i| lengths[i] as u64).sum::<u64>();
        stats.padded_tokens += (longest * members.len()) as u64;
        stats.batches += 1;
    }
    stats.computed_rows = rows.len() as u64;
    stats.rows = rows.len() as u64;
    stats.finish(&teacher.device, started.elapsed());
    let item = Arc::new(Field::new_list_field(DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("logits", DataType::FixedSizeList(item.clone(), 3), false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(
                FixedSizeListArray::try_new(item, 3, Arc::new(Float32Array::from(flat)), None)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?,
            ),
        ],
    )
    .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let partial = opts.output.with_extension("parquet.partial");
    let write = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let file = File::create(&partial)?;
        let mut writer = ArrowWriter::try_new(file, schema.clone(), None)?;
        writer.write(&batch)?;
        writer.close()?;
        std::fs::rename(&partial, &opts.output)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&partial);
        return Err(invalid(&opts.output, e));
    }
    Ok(stats)
}
