//! `average_adapters(table, location, k [, mode [, weights [, tau [, model [, dtype]]]]])`:
//! recipe stage 6 in a plan. The `k` fold adapters at `location` (with `{fold}` where the
//! fold number goes, e.g. `runs/r/train/student/fold{fold}/adapter/`) averaged into one
//! ([`arenaflow_models::average`]): mode `mean` (default; the weighted mean of every
//! `lora_A`, `lora_B` and score-head tensor, a PEFT folder `adapter/`) or `delta` (base
//! `model` + the weighted mean of the folds' merged updates, a merged folder `model/` in
//! `dtype`, f32 by default). `table` gives one row per fold: `fold` (0..k-1, each once)
//! and `log_loss` (its held-out log loss: what `group_relative` weighs by, w_f ∝ exp((mean
//! − log_loss_f) / tau), tau 0.05 by default; `uniform`, the default, ignores it). The
//! result goes into the managed COPY's output folder beside the rows written: `fold`,
//! `adapter`, `log_loss`, `weight`.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int32Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{exec_err, plan_err, DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::TryStreamExt;

use arenaflow_models::average::{average_adapters, average_merged, FoldWeights};

use crate::args::Args;
use crate::run_state::ManagedOutput;
use crate::scaffold::{Operator, OperatorRun, OperatorTable};

const USAGE: &str =
    "average_adapters(table, location, k [, mode [, weights [, tau [, model [, dtype]]]]])";
const NAME: &str = "average_adapters";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Mean,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Weighting {
    Uniform,
    GroupRelative,
}

#[derive(Debug, Clone)]
struct Averaging {
    adapters: Vec<PathBuf>,
    mode: Mode,
    weighting: Weighting,
    tau: f64,
    model: Option<String>,
    dtype: String,
}

/// The table function.
#[derive(Debug)]
pub struct AverageAdaptersFunction;

impl TableFunctionImpl for AverageAdaptersFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let location = args.required_string(1, "location")?;
        let Some(k) = args.count(2, "k")? else {
            return plan_err!("{USAGE}: k (the number of folds) is required");
        };
        if !location.contains("{fold}") {
            return plan_err!(
                "{USAGE}: location {location} has no {{fold}} where the fold number goes"
            );
        }
        let mode = args
            .choice(3, "mode", &[("mean", Mode::Mean), ("delta", Mode::Delta)])?
            .unwrap_or(Mode::Mean);
        let weighting = args
            .choice(
                4,
                "weights",
                &[
                    ("uniform", Weighting::Uniform),
                    ("group_relative", Weighting::GroupRelative),
                ],
            )?
            .unwrap_or(Weighting::Uniform);
        let tau = match args.string(5, "tau")? {
            None => 0.05,
            Some(text) => match text.trim().parse::<f64>() {
                Ok(t) if t > 0.0 && t.is_finite() => t,
                _ => return plan_err!("{NAME}: tau {text:?}; expected a positive number"),
            },
        };
        let model = args.string(6, "model")?.filter(|m| !m.is_empty());
        let dtype = args.string(7, "dtype")?.unwrap_or_else(|| "f32".into());
        match (mode, &model) {
            (Mode::Delta, None) => {
                return plan_err!(
                    "{NAME}: mode 'delta' needs model (the base the adapters were trained on)"
                )
            }
            (Mode::Mean, Some(_)) => {
                return plan_err!(
                    "{NAME}: model is for mode 'delta'; mode 'mean' writes an adapter"
                )
            }
            (Mode::Delta, Some(model)) => {
                arenaflow_models::checkpoint::parse_dtype(&dtype)
                    .map_err(|e| DataFusionError::Plan(format!("{NAME}: {e}")))?;
                for file in arenaflow_models::checkpoint::model_files(model)
                    .map_err(|e| DataFusionError::Plan(format!("{NAME}: {e}")))?
                {
                    args.record_input(&file.display().to_string());
                }
            }
            (Mode::Mean, None) => {}
        }
        let adapters: Vec<PathBuf> = (0..k)
            .map(|fold| PathBuf::from(location.replace("{fold}", &fold.to_string())))
            .collect();
        for adapter in &adapters {
            args.record_input(&adapter.display().to_string());
        }
        let averaging = Averaging {
            adapters,
            mode,
            weighting,
            tau,
            model,
            dtype,
        };
        Ok(Arc::new(OperatorTable::try_new(averaging, args.table(0)?)?))
    }
}

fn output_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("fold", DataType::Int32, false),
        Field::new("adapter", DataType::Utf8, false),
        Field::new("log_loss", DataType::Float64, true),
        Field::new("weight", DataType::Float64, false),
    ]))
}

impl Operator for Averaging {
    const NAME: &'static str = "AverageAdaptersExec";

    fn output_schema(&self, input: &Schema) -> Result<SchemaRef> {
        for (column, numeric) in [("fold", true), ("log_loss", true)] {
            match input.field_with_name(column) {
                Ok(f) if !numeric || f.data_type().is_numeric() || f.data_type().is_null() => {}
                Ok(f) => {
                    return plan_err!(
                        "{NAME}: column {column} is {}, expected a number",
                        f.data_type()
                    )
                }
                Err(_) => {
                    return plan_err!(
                    "{NAME}: the input has no column {column} (one row per fold: fold, log_loss)"
                )
                }
            }
        }
        Ok(output_schema())
    }

    fn single_partition(&self) -> bool {
        true
    }

    fn input_order(&self) -> &'static [&'static str] {
        &["fold"]
    }

    fn execute(&self, run: OperatorRun) -> Result<SendableRecordBatchStream> {
        let output = ManagedOutput::local_artifact_dir(&run.context, NAME, "an averaged adapter")?;
        let this = self.clone();
        let schema = run.schema.clone();
        let input = run.input;
        let stream = futures::stream::once(async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            let log_losses = this.fold_log_losses(&batches)?;
            let job = this.clone();
            let losses = log_losses.clone();
            let weights = tokio::task::spawn_blocking(move || job.write(&losses, &output))
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))??;
            this.rows(schema, &log_losses, &weights)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(run.schema, stream)))
    }
}

impl Averaging {
    /// Each fold's held-out log loss (None where null), in fold order; every fold
    /// 0..k-1 exactly once.
    fn fold_log_losses(&self, batches: &[RecordBatch]) -> Result<Vec<Option<f64>>> {
        let k = self.adapters.len();
        let mut losses: Vec<Option<Option<f64>>> = vec![None; k];
        for batch in batches {
            let column = |name: &str, to: &DataType| -> Result<ArrayRef> {
                Ok(cast(batch.column(batch.schema().index_of(name)?), to)?)
            };
            let folds = column("fold", &DataType::Int64)?;
            let folds = folds.as_primitive::<Int64Type>();
            let log_loss = column("log_loss", &DataType::Float64)?;
            let log_loss = log_loss.as_primitive::<Float64Type>();
            for row in 0..batch.num_rows() {
                if folds.is_null(row) {
                    return exec_err!("{NAME}: a row has no fold");
                }
                let fold = folds.value(row);
                let Some(slot) = usize::try_from(fold).ok().and_then(|f| losses.get_mut(f)) else {
                    return exec_err!(
                        "{NAME}: fold {fold} is not one of the {k} folds 0..{}",
                        k - 1
                    );
                };
                if slot.is_some() {
                    return exec_err!("{NAME}: fold {fold} is given twice");
                }
                *slot = Some((!log_loss.is_null(row)).then(|| log_loss.value(row)));
            }
        }
        losses
            .into_iter()
            .enumerate()
            .map(|(fold, l)| match l {
                Some(l) => Ok(l),
                None => exec_err!(
                    "{NAME}: no row for fold {fold}: every fold 0..{} must be averaged",
                    k - 1
                ),
            })
            .collect()
    }

    /// Averages the adapters into `output` (`adapter/` or `model/`); the weights used.
    fn write(&self, log_losses: &[Option<f64>], output: &std::path::Path) -> Result<Vec<f64>> {
        let weights = match self.weighting {
            Weighting::Uniform => FoldWeights::Uniform,
            Weighting::GroupRelative => FoldWeights::GroupRelative {
                log_losses: log_losses
                    .iter()
                    .enumerate()
                    .map(|(fold, l)| match l {
                        Some(l) => Ok(*l),
                        None => exec_err!(
                            "{NAME}: group_relative weights need fold {fold}'s held-out log loss; it is null"
                        ),
                    })
                    .collect::<Result<_>>()?,
                tau: self.tau,
            },
        };
        let model_error = |e: arenaflow_models::ModelError| DataFusionError::External(Box::new(e));
        match (&self.mode, &self.model) {
            (Mode::Delta, Some(model)) => {
                let dtype =
                    arenaflow_models::checkpoint::parse_dtype(&self.dtype).map_err(model_error)?;
                average_merged(
                    model,
                    &self.adapters,
                    &weights,
                    dtype,
                    &output.join("model"),
                )
                .map_err(model_error)
            }
            _ => average_adapters(&self.adapters, &weights, &output.join("adapter"))
                .map_err(model_error),
        }
    }

    fn rows(
        &self,
        schema: SchemaRef,
        log_losses: &[Option<f64>],
        weights: &[f64],
    ) -> Result<RecordBatch> {
        let k = self.adapters.len();
        let folds = Int32Array::from_iter_values(0..k as i32);
        let adapters =
            StringArray::from_iter_values(self.adapters.iter().map(|a| a.display().to_string()));
        let losses = Float64Array::from(log_losses.to_vec());
        let weights = Float64Array::from(weights.to_vec());
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(folds),
                Arc::new(adapters),
                Arc::new(losses),
                Arc::new(weights),
            ],
        )?)
    }
}
