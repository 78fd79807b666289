//! `arenaflow quantize`: GPTQ of a model (with its adapter merged) from calibration rows of
//! token ids, written as a GPTQ checkpoint folder that transformers' GPTQ loaders and
//! arenaflow read (issue 16).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arenaflow_models::checkpoint::{load_classifier, parse_dtype, save_gptq};
use arenaflow_models::device::parse_device;
use arenaflow_models::gptq::{GptqConfig, GptqSettings};
use arenaflow_models::quantize::quantize_gptq;
use datafusion::arrow::array::{Array, Int32Array, ListArray};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{EngineError, Result};

pub struct QuantizeOptions {
    pub model: String,
    /// A PEFT adapter, merged into the weights before quantizing.
    pub adapter: Option<PathBuf>,
    /// Parquet with `input_ids` (list<int32>): the first `rows` rows calibrate.
    pub input: PathBuf,
    pub rows: usize,
    pub output: PathBuf,
    pub dtype: String,
    pub device: String,
    pub gptq: GptqConfig,
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {message}", path.display()))
}

/// The first `limit` rows' `input_ids` of a Parquet file, in file order, each checked
/// non-empty and below the vocabulary size.
pub fn calibration_rows(path: &Path, limit: usize, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let file = File::open(path).map_err(|e| invalid(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| invalid(path, e))?
        .build()
        .map_err(|e| invalid(path, e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| invalid(path, e))?;
        let column = batch
            .column_by_name("input_ids")
            .ok_or_else(|| invalid(path, "no column input_ids"))?;
        let lists = column.as_any().downcast_ref::<ListArray>().ok_or_else(|| {
            invalid(
                path,
                format!(
                    "column input_ids is {}, not list<int32>",
                    column.data_type()
                ),
            )
        })?;
        for i in 0..lists.len() {
            if rows.len() == limit {
                return Ok(rows);
            }
            let row = rows.len();
            let ids = lists.value(i);
            let ids = ids
                .as_any()
                .downcast_ref::<Int32Array>()
                .ok_or_else(|| invalid(path, "column input_ids is not list<int32>"))?;
            if lists.is_null(i) || ids.is_empty() || ids.null_count() > 0 {
                return Err(invalid(
                    path,
                    format!("row {row}, column input_ids: empty or null"),
                ));
            }
            let tokens: Vec<u32> = ids.values().iter().map(|&t| t as u32).collect();
            if let Some(bad) = ids.values().iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(invalid(
                    path,
                    format!("row {row}, column input_ids: token id {bad} outside the model's vocabulary of {vocab}"),
                ));
            }
            rows.push(tokens);
        }
    }
    if rows.is_empty() {
        return Err(invalid(path, "no rows to calibrate on"));
    }
    Ok(rows)
}

/// What a quantization did.
pub struct QuantizeStats {
    pub rows: usize,
    pub tokens: usize,
    pub projections: usize,
    pub seconds: f64,
}

/// Loads the model (merging the adapter), quantizes every projection with GPTQ on the
/// calibration rows and writes the checkpoint folder (whole or not at all).
pub fn run_quantize(opts: &QuantizeOptions) -> Result<QuantizeStats> {
    let started = Instant::now();
    // Checked before hours of work: the checkpoint format packs only these widths.
    if ![2, 4, 8].contains(&opts.gptq.bits) {
        return Err(EngineError::Invalid(format!(
            "--bits {}: a GPTQ checkpoint holds 2, 4 or 8",
            opts.gptq.bits
        )));
    }
    let device = parse_device(&opts.device)?;
    let mut model = load_classifier(
        &opts.model,
        opts.adapter.as_deref(),
        parse_dtype(&opts.dtype)?,
        &device,
    )?;
    if model.lora.is_some() {
        model.merge_adapters()?;
    }
    let rows = calibration_rows(&opts.input, opts.rows, model.config.vocab_size)?;
    let layers = model.config.num_layers;
    let quantized = quantize_gptq(&mut model, &rows, &opts.gptq, |l| {
        eprintln!(
            "quantize: layer {}/{layers} done, {:.1} s",
            l + 1,
            started.elapsed().as_secs_f64()
        );
    })?;
    let settings = GptqSettings {
        bits: opts.gptq.bits,
        group_size: opts.gptq.group_size,
        desc_act: opts.gptq.act_order,
        sym: opts.gptq.sym,
    };
    save_gptq(&model, &quantized, &settings, &opts.output)?;
    Ok(QuantizeStats {
        rows: rows.len(),
        tokens: rows.iter().map(|r| r.len()).sum(),
        projections: quantized.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
