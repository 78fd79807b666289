//! `quantize(table, model [, adapter [, rows [, bits [, group_size [, damp_percent [,
//! act_order [, dtype [, device]]]]]]]])`: recipe stage 7 in a plan. GPTQ
//! ([`arenaflow_models::quantize::quantize_gptq`]) of `model` with `adapter` merged (a PEFT
//! folder; empty: none), calibrated on the first `rows` rows (128 by default) of `table`
//! (`id`, `order`, `input_ids`: tokenized rows, taken in (id, order) order), `bits` 8 and
//! groups of `group_size` 128 (0: one group per row) by default, damping `damp_percent` 0.01
//! of H's mean diagonal (transformers' GPTQConfig uses 0.1), act-order off (`true` turns it
//! on), the forward in `dtype` (bf16) on `device` (cpu). The checkpoint (config.json with
//! its `quantization_config`, model.safetensors with qweight / qzeros / scales / g_idx)
//! goes into the managed COPY's output folder as `model/`, beside the rows written: one
//! per quantized projection (`projection`, `in_features`, `out_features`, `bits`,
//! `group_size`) with the calibration's `rows` and `tokens`.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{exec_err, plan_err, DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::TryStreamExt;

use arenaflow_models::checkpoint::{load_classifier, parse_dtype, save_gptq};
use arenaflow_models::device::parse_device;
use arenaflow_models::gptq::{GptqConfig, GptqSettings};
use arenaflow_models::quantize::quantize_gptq;

use crate::args::Args;
use crate::run_state::ManagedOutput;
use crate::scaffold::{Operator, OperatorRun, OperatorTable};
use crate::token_rows::{row_keys, token_rows, ID, INPUT_IDS, ORDER};

const USAGE: &str = "quantize(table, model [, adapter [, rows [, bits [, group_size [, damp_percent [, act_order [, dtype [, device]]]]]]]])";
const NAME: &str = "quantize";

#[derive(Debug, Clone)]
struct Quantize {
    model: String,
    adapter: Option<PathBuf>,
    rows: usize,
    gptq: GptqConfig,
    dtype: String,
    device: String,
}

/// The table function.
#[derive(Debug)]
pub struct QuantizeFunction;

impl TableFunctionImpl for QuantizeFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let model = args.required_string(1, "model")?;
        let adapter = args
            .string(2, "adapter")?
            .filter(|a| !a.is_empty())
            .map(PathBuf::from);
        let rows = args.count(3, "rows")?.unwrap_or(128);
        let bits = args.integer(4, "bits", 2)?.unwrap_or(8);
        if ![2, 4, 8].contains(&bits) {
            return plan_err!(
                "{NAME}: bits {bits}; a GPTQ checkpoint holds 2, 4 or 8 (8 and 4 are the usual)"
            );
        }
        let group_size = match args.integer(5, "group_size", 0)?.unwrap_or(128) {
            0 => None,
            g => Some(g as usize),
        };
        let damp_percent = args.fraction(6, "damp_percent")?.unwrap_or(0.01);
        let act_order = args
            .choice(7, "act_order", &[("false", false), ("true", true)])?
            .unwrap_or(false);
        let dtype = args.string(8, "dtype")?.unwrap_or_else(|| "bf16".into());
        let device = args.string(9, "device")?.unwrap_or_else(|| "cpu".into());
        parse_dtype(&dtype).map_err(|e| DataFusionError::Plan(format!("{NAME}: {e}")))?;
        for file in arenaflow_models::checkpoint::model_files(&model)
            .map_err(|e| DataFusionError::Plan(format!("{NAME}: {e}")))?
        {
            args.record_input(&file.display().to_string());
        }
        if let Some(adapter) = &adapter {
            args.record_input(&adapter.display().to_string());
        }
        let quantize = Quantize {
            model,
            adapter,
            rows,
            gptq: GptqConfig {
                bits: bits as u32,
                group_size,
                damp_percent,
                act_order,
                ..GptqConfig::default()
            },
            dtype,
            device,
        };
        Ok(Arc::new(OperatorTable::try_new(quantize, args.table(0)?)?))
    }
}

fn output_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("projection", DataType::Utf8, false),
        Field::new("in_features", DataType::Int64, false),
        Field::new("out_features", DataType::Int64, false),
        Field::new("bits", DataType::UInt32, false),
        Field::new("group_size", DataType::Int64, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("tokens", DataType::Int64, false),
    ]))
}

impl Operator for Quantize {
    const NAME: &'static str = "QuantizeExec";

    fn output_schema(&self, input: &Schema) -> Result<SchemaRef> {
        for column in [ID, ORDER, INPUT_IDS] {
            if input.field_with_name(column).is_err() {
                return plan_err!(
                    "{NAME}: the input has no column {column} (tokenized rows: id, order, input_ids)"
                );
            }
        }
        Ok(output_schema())
    }

    fn single_partition(&self) -> bool {
        true
    }

    fn input_order(&self) -> &'static [&'static str] {
        &[ID, ORDER]
    }

    fn execute(&self, run: OperatorRun) -> Result<SendableRecordBatchStream> {
        let output = ManagedOutput::local_artifact_dir(&run.context, NAME, "a GPTQ checkpoint")?
            .join("model");
        let this = self.clone();
        let schema = run.schema.clone();
        let input = run.input;
        let stream = futures::stream::once(async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            tokio::task::spawn_blocking(move || this.write(&batches, &output, schema))
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(run.schema, stream)))
    }
}

impl Quantize {
    /// Loads the model, quantizes it on the first rows of `batches` and writes the
    /// checkpoint to `output`; one row per projection.
    fn write(
        &self,
        batches: &[RecordBatch],
        output: &std::path::Path,
        schema: SchemaRef,
    ) -> Result<RecordBatch> {
        let model_error = |e: arenaflow_models::ModelError| DataFusionError::External(Box::new(e));
        let device = parse_device(&self.device).map_err(model_error)?;
        let dtype = parse_dtype(&self.dtype).map_err(model_error)?;
        let mut model = load_classifier(&self.model, self.adapter.as_deref(), dtype, &device)
            .map_err(model_error)?;
        if model.lora.is_some() {
            model.merge_adapters().map_err(model_error)?;
        }
        let mut rows = Vec::new();
        let mut seen = 0;
        for batch in batches {
            if rows.len() == self.rows {
                break;
            }
            let keys = row_keys(NAME, batch)?;
            let tokens = token_rows(NAME, batch, seen, &keys, model.config.vocab_size)?;
            seen += batch.num_rows();
            rows.extend(tokens.into_iter().take(self.rows - rows.len()));
        }
        if rows.is_empty() {
            return exec_err!("{NAME}: no rows to calibrate on");
        }
        let quantized =
            quantize_gptq(&mut model, &rows, &self.gptq, |_| {}).map_err(model_error)?;
        let settings = GptqSettings {
            bits: self.gptq.bits,
            group_size: self.gptq.group_size,
            desc_act: self.gptq.act_order,
            sym: self.gptq.sym,
        };
        save_gptq(&model, &quantized, &settings, output).map_err(model_error)?;
        let n = quantized.len();
        let tokens: usize = rows.iter().map(Vec::len).sum();
        let column = |f: &dyn Fn(&arenaflow_models::gptq::QuantizedLinear) -> i64| {
            Int64Array::from_iter_values(quantized.values().map(f))
        };
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(quantized.keys())),
                Arc::new(column(&|q| q.in_features as i64)),
                Arc::new(column(&|q| q.out_features as i64)),
                Arc::new(UInt32Array::from_iter_values(
                    quantized.values().map(|q| q.bits),
                )),
                Arc::new(column(&|q| q.group_size as i64)),
                Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                    rows.len() as i64,
                    n,
                ))),
                Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                    tokens as i64,
                    n,
                ))),
            ],
        )?)
    }
}
