//! The `distill_step` operator: trains on every input row (`id`, `order`, `input_ids`,
//! `label`, optional `weight`, optional `split` ('train' / 'dev'), the named teacher logit
//! columns) and emits one row per optimizer step and per evaluation. Inside a managed
//! output ([`ManagedOutput`]) it commits a checkpoint every `checkpoint_every` steps into
//! the resume folder, so that the same command continues after kill -9, and writes the
//! adapter (PEFT folder `adapter/`) into the output, beside the metrics.
//!
//! SQL: `distill_step(table, model [, settings])`, settings as `key=value` pairs
//! (`lr=2e-4 lora_r=16 teachers=logits_a,logits_b ...`, see [`TrainSettings::KNOBS`]).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, UInt64Array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Field, Float32Type, Float64Type, Int64Type, Schema, SchemaRef,
};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;

use super::plot::write_loss_curve;
use super::{load_model, write_adapter, TrainSettings, TrainingStats};
use crate::args::Args;
use crate::error::OperatorError;
use crate::run_state::ManagedOutput;
use crate::scaffold::{Operator, OperatorRun, OperatorTable};
use crate::teacher_forward::Progress;
use crate::token_rows::{input_error, row_keys, token_rows, ID, INPUT_IDS, ORDER};
use arenaflow_models::train::{state, Event, Rendezvous, TrainRow, Trainer};

const NAME: &str = "distill_step";
const LABEL: &str = "label";
const WEIGHT: &str = "weight";
const SPLIT: &str = "split";

fn external(e: OperatorError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// The metric columns: kind ('step' / 'eval'), step, epoch, lr, loss, ce, kl_{t} and
/// cos_{t} per teacher, grad_norm, rows, tokens, tokens_per_s, dev_log_loss, dev_accuracy.
pub fn output_schema(teachers: &[String]) -> SchemaRef {
    let f = |name: &str| Field::new(name, DataType::Float64, true);
    let mut fields = vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("step", DataType::UInt64, false),
        f("epoch"),
        f("lr"),
        f("loss"),
        f("ce"),
    ];
    for t in teachers {
        fields.push(f(&format!("kl_{t}")));
        fields.push(f(&format!("cos_{t}")));
    }
    fields.extend([
        f("grad_norm"),
        Field::new("rows", DataType::UInt64, true),
        Field::new("tokens", DataType::UInt64, true),
        f("tokens_per_s"),
        f("dev_log_loss"),
        f("dev_accuracy"),
    ]);
    Arc::new(Schema::new(fields))
}

/// Checks the input's columns.
fn check_input(input: &Schema, settings: &TrainSettings) -> Result<()> {
    let field = |name: &str| match input.field_with_name(name) {
        Ok(f) => Ok(f.data_type().clone()),
        Err(_) => plan_err!("{NAME}: the input has no column {name}"),
    };
    field(ID)?;
    field(ORDER)?;
    match field(INPUT_IDS)? {
        DataType::List(item) | DataType::LargeList(item) if item.data_type().is_integer() => {}
        other => return plan_err!("{NAME}: column input_ids is {other}, not a list of token ids"),
    }
    if !field(LABEL)?.is_integer() {
        return plan_err!("{NAME}: column label must be an integer (0 = A, 1 = B, 2 = tie)");
    }
    if let Ok(w) = input.field_with_name(WEIGHT) {
        if !w.data_type().is_numeric() {
            return plan_err!("{NAME}: column weight is {}, not a number", w.data_type());
        }
    }
    for t in &settings.teachers {
        match input.field_with_name(t).map(|f| f.data_type().clone()) {
            Ok(DataType::FixedSizeList(item, 3)) | Ok(DataType::List(item))
                if item.data_type().is_floating() => {}
            Ok(other) => {
                return plan_err!("{NAME}: teacher column {t} is {other}, not 3 logits (f32)")
            }
            Err(_) => {
                return plan_err!(
                    "{NAME}: no teacher column {t}; the input has {}",
                    input
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }
    Ok(())
}

/// The training operator: its settings, and the figures of its run once it has run. One
/// output partition.
pub struct DistillStep {
    pub settings: TrainSettings,
    figures: Arc<parking_lot::Mutex<Option<TrainingStats>>>,
}

impl fmt::Debug for DistillStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.settings)
    }
}

impl Operator for DistillStep {
    const NAME: &'static str = "DistillStepExec";

    fn output_schema(&self, input: &Schema) -> Result<SchemaRef> {
        check_input(input, &self.settings)?;
        Ok(output_schema(&self.settings.teachers))
    }

    fn single_partition(&self) -> bool {
        true
    }

    /// The rows are a set: sorted by (id, order), any arrival order trains the same.
    fn input_order(&self) -> &'static [&'static str] {
        &[ID, ORDER]
    }

    fn execute(&self, run: OperatorRun) -> Result<SendableRecordBatchStream> {
        let managed = ManagedOutput::of(&run.context);
        let checkpoint = match &managed {
            Some(output) => Some(output.resume_dir.join(self.resume_key(&run.input_plan))),
            None => self.settings.checkpoint_dir.clone(),
        };
        let (adapter, loss_curve) = match (&self.settings.output, &managed) {
            (Some(dir), _) => (dir.clone(), dir.join("loss.png")),
            (None, Some(output)) if !output.artifact_dir.contains("://") => {
                let artifacts = PathBuf::from(&output.artifact_dir);
                (artifacts.join("adapter"), artifacts.join("loss.png"))
            }
            (None, Some(output)) => {
                return Err(external(OperatorError::Config(format!(
                    "{NAME}: the adapter is written to a local folder; {} is not one (set output=DIR)",
                    output.artifact_dir
                ))))
            }
            (None, None) => {
                return Err(external(OperatorError::Config(format!(
                    "{NAME} writes an adapter: run it in a COPY into the run directory, or set output=DIR"
                ))))
            }
        };
        let job = Job {
            settings: self.settings.clone(),
            managed: managed.is_some(),
            schema: run.schema.clone(),
            checkpoint,
            adapter,
            loss_curve,
            figures: self.figures.clone(),
        };
        let mut builder = RecordBatchReceiverStream::builder(run.schema, 4);
        let sender = builder.tx();
        let input = run.input;
        builder.spawn(async move { job.run(input, sender).await });
        Ok(builder.build())
    }
}

impl DistillStep {
    pub fn new(settings: TrainSettings) -> Self {
        Self {
            settings,
            figures: Arc::default(),
        }
    }

    /// The figures of the finished run, if it finished.
    pub fn figures(&self) -> Option<TrainingStats> {
        self.figures.lock().clone()
    }

    /// The checkpoint subfolder of one run: its settings and input plan, hashed.
    fn resume_key(&self, input: &Arc<dyn ExecutionPlan>) -> String {
        let input = datafusion::physical_plan::displayable(input.as_ref())
            .indent(false)
            .to_string();
        let mut settings = self.settings.clone();
        settings.output = None;
        settings.checkpoint_dir = None;
        let text = format!("{settings:?}\n{input}");
        format!(
            "{NAME}-{:016x}",
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        )
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<RecordBatch>>;

struct Job {
    settings: TrainSettings,
    /// Run inside a plan's run directory (not `arenaflow train`'s output folder).
    managed: bool,
    schema: SchemaRef,
    checkpoint: Option<PathBuf>,
    adapter: PathBuf,
    /// The loss-curve PNG: beside the adapter in a run directory, inside `output` otherwise.
    loss_curve: PathBuf,
    figures: Arc<parking_lot::Mutex<Option<TrainingStats>>>,
}

impl Job {
    async fn run(self, mut input: SendableRecordBatchStream, sender: Sender) -> Result<()> {
        if self.adapter.exists() {
            return Err(external(OperatorError::Config(format!(
                "{NAME}: {} already exists; refusing to overwrite it",
                self.adapter.display()
            ))));
        }
        arenaflow_models::device::reset_peak();
        let mut settings = self.settings.clone();
        let rendezvous = data_parallel_rank().map_err(external)?;
        if let Some(rv) = &rendezvous {
            if self.managed {
                return Err(external(OperatorError::Config(format!(
                    "{NAME}: data-parallel ranks (WORLD_SIZE {}) train through `arenaflow train`; \
                     inside a plan they would share the run directory",
                    rv.world
                ))));
            }
            // Each rank takes the GPU of its local rank unless the device names one.
            if settings.device == "cuda" {
                settings.device = format!("cuda:{}", rv.local_rank);
            }
        }
        let model = tokio::task::spawn_blocking(move || load_model(&settings))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(external)?;
        let vocab = model.config.vocab_size;
        let mut rows = Vec::new();
        let mut seen = HashSet::new();
        while let Some(batch) = input.next().await {
            let batch = batch?;
            let first = rows.len();
            read_rows(
                &batch,
                first,
                vocab,
                &self.settings.teachers,
                &mut seen,
                &mut rows,
            )?;
        }
        if rows.is_empty() {
            return Err(input_error(NAME, "the input has no rows".into()));
        }
        let job = Arc::new(self);
        let worker = job.clone();
        let train_sender = sender.clone();
        tokio::task::spawn_blocking(move || worker.train(model, rows, rendezvous, &train_sender))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
    }

    /// Builds the trainer (resuming from the checkpoint where there is one), runs it,
    /// sends each event as a row, commits checkpoints, writes the adapter.
    /// With `rendezvous` the trainer is one rank of a data-parallel run; only rank 0 writes
    /// checkpoints, the adapter and the loss curve (every rank resumes from rank 0's
    /// checkpoint).
    fn train(
        &self,
        model: arenaflow_models::models::SequenceClassifier,
        rows: Vec<TrainRow>,
        rendezvous: Option<Rendezvous>,
        sender: &Sender,
    ) -> Result<()> {
        let mut trainer = Trainer::new(model, self.settings.train.clone(), rows)
            .map_err(|e| external(e.into()))?;
        let leader = rendezvous.as_ref().is_none_or(|rv| rv.rank == 0);
        if let Some(rv) = &rendezvous {
            let timeout = std::env::var("ARENAFLOW_RENDEZVOUS_TIMEOUT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(600);
            eprintln!(
                "{NAME}: rank {} of {}, joining rank 0 at {}:{} (up to {timeout} s)",
                rv.rank, rv.world, rv.master_addr, rv.master_port
            );
            let collective: Box<dyn arenaflow_models::train::collective::Collective> = Box::new(
                rv.connect(std::time::Duration::from_secs(timeout))
                    .map_err(|e| external(e.into()))?,
            );
            let collective = between_gpus(collective, trainer.model.device());
            trainer = trainer.with_collective(collective);
        }
        if let Some(dir) = &self.checkpoint {
            if state::exists(dir) {
                state::restore(&mut trainer, dir).map_err(|e| external(e.into()))?;
                eprintln!(
                    "{NAME}: resuming after step {} of {} ({})",
                    trainer.steps_done(),
                    trainer.total_steps(),
                    dir.display()
                );
            }
        }
        eprintln!(
            "{NAME}: {} training rows, {} dev rows, {} teacher(s), {} steps ({} warm-up), {} trainable tensors",
            trainer.train_rows(),
            trainer.dev_rows(),
            trainer.teachers(),
            trainer.total_steps(),
            trainer.warmup_steps(),
            trainer.named_vars().count()
        );
        for event in trainer.events() {
            if sender.blocking_send(Ok(self.event_batch(event)?)).is_err() {
                return Ok(());
            }
        }
        let mut progress = Progress::with_unit(
            NAME,
            "steps",
            trainer.total_steps() as u64,
            trainer.steps_done() as u64,
        );
        let every = self.settings.checkpoint_every;
        let resumed_at = trainer.steps_done();
        let mut stopped = false;
        let profiling = arenaflow_models::profile::enable_from_env();
        let result = trainer.run(&mut |t, event| {
            let batch = self
                .event_batch(event)
                .map_err(|e| arenaflow_models::ModelError::Input(e.to_string()))?;
            match event {
                Event::Step(m) => {
                    progress.set_note(format!("loss {:.4}", m.terms.loss));
                    progress.advance(1, m.tokens as u64);
                    if let (Some(dir), true) =
                        (&self.checkpoint, leader && every > 0 && m.step % every == 0)
                    {
                        state::save(t, dir)?;
                        pause_for_tests(m.step);
                    }
                }
                Event::Eval(e) => eprintln!(
                    "{NAME}: step {}: dev log loss {:.4}, accuracy {:.3} ({} rows)",
                    e.step, e.log_loss, e.accuracy, e.rows
                ),
            }
            if !stopped && sender.blocking_send(Ok(batch)).is_err() {
                stopped = true;
            }
            Ok(())
        });
        progress.finish();
        if profiling {
            arenaflow_models::profile::enable(false);
            eprintln!(
                "{NAME}: profile (forward sections, the device synchronised around each): {}",
                arenaflow_models::profile::report()
            );
        }
        result.map_err(|e| external(e.into()))?;
        let computed = trainer.steps_done() - resumed_at;
        if let (Some(dir), true) = (&self.checkpoint, leader) {
            state::save(&trainer, dir).map_err(|e| external(e.into()))?;
        }
        let device = trainer.model.device();
        let peak = (
            arenaflow_models::device::peak_memory(device),
            arenaflow_models::device::peak_allocated(device),
        );
        let events = trainer.events().to_vec();
        let (train_rows, dev_rows, steps) = (
            trainer.train_rows(),
            trainer.dev_rows(),
            trainer.steps_done(),
        );
        let (model, best) = trainer.finish().map_err(|e| external(e.into()))?;
        if let Some((step, loss)) = best {
            eprintln!("{NAME}: keeping the adapter of step {step} (dev log loss {loss:.4})");
        }
        let stats = self.stats(&events, (train_rows, dev_rows, steps), computed, best, peak);
        if leader {
            write_adapter(&model, &self.adapter).map_err(external)?;
            write_loss_curve(&events, &self.loss_curve).map_err(external)?;
            eprintln!(
                "{NAME}: wrote {} and {}; {}",
                self.adapter.display(),
                self.loss_curve.display(),
                stats.summary()
            );
        } else {
            eprintln!(
                "{NAME}: done (rank 0 writes the adapter); {}",
                stats.summary()
            );
        }
        *self.figures.lock() = Some(stats);
        Ok(())
    }

    /// The run's figures from its events: the steps this invocation computed give the
    /// speed and the time shares; the evaluations give the dev log losses.
    fn stats(
        &self,
        events: &[Event],
        (train_rows, dev_rows, steps): (usize, usize, usize),
        computed: usize,
        best: Option<(usize, f64)>,
        (peak_memory_bytes, peak_allocated_bytes): (Option<u64>, Option<u64>),
    ) -> TrainingStats {
        let step_metrics: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Step(m) => Some(m),
                Event::Eval(_) => None,
            })
            .collect();
        let fresh = &step_metrics[step_metrics.len().saturating_sub(computed)..];
        let seconds: f64 = fresh.iter().map(|m| m.seconds).sum();
        let share = |f: fn(&&arenaflow_models::train::StepMetrics) -> f64| {
            if seconds > 0.0 {
                fresh.iter().map(f).sum::<f64>() / seconds
            } else {
                0.0
            }
        };
        let tokens: u64 = fresh.iter().map(|m| m.tokens as u64).sum();
        let last_dev = events.iter().rev().find_map(|e| match e {
            Event::Eval(m) => Some(m.log_loss),
            Event::Step(_) => None,
        });
        let s = &self.settings;
        TrainingStats {
            operator: NAME.into(),
            model: s.model.clone(),
            device: s.device.clone(),
            dtype: s.dtype.clone(),
            train_rows,
            dev_rows,
            teachers: s.teachers.len(),
            steps,
            computed_steps: computed,
            tokens,
            seconds,
            tokens_per_second: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
            forward_share: share(|m| m.forward_seconds),
            backward_share: share(|m| m.backward_seconds),
            optimizer_share: share(|m| m.optimizer_seconds),
            peak_memory_bytes,
            peak_allocated_bytes,
            keep: s.current("keep"),
            kept_step: best.map_or(steps, |b| b.0),
            kept_dev_log_loss: best.map(|b| b.1).or(last_dev),
            last_dev_log_loss: last_dev,
            settings: TrainSettings::KNOBS
                .iter()
                .map(|(k, _)| (k.to_string(), serde_json::Value::String(s.current(k))))
                .collect(),
        }
    }

    /// One event as a one-row batch of the output schema.
    fn event_batch(&self, event: &Event) -> Result<RecordBatch> {
        let f = |v: Option<f64>| Arc::new(Float64Array::from(vec![v])) as ArrayRef;
        let u = |v: Option<u64>| Arc::new(UInt64Array::from(vec![v])) as ArrayRef;
        let teachers = self.settings.teachers.len();
        let mut columns: Vec<ArrayRef> = Vec::new();
        match event {
            Event::Step(m) => {
                columns.push(Arc::new(StringArray::from(vec!["step"])));
                columns.push(u(Some(m.step as u64)));
                columns.extend([
                    f(Some(m.epoch)),
                    f(Some(m.lr)),
                    f(Some(m.terms.loss)),
                    f(Some(m.terms.ce)),
                ]);
                for t in 0..teachers {
                    columns.push(f(m.terms.kl.get(t).copied()));
                    columns.push(f(m.terms.cos.get(t).copied()));
                }
                columns.extend([
                    f(Some(m.grad_norm)),
                    u(Some(m.rows as u64)),
                    u(Some(m.tokens as u64)),
                    f(Some(m.tokens_per_second())),
                    f(None),
                    f(None),
                ]);
            }
            Event::Eval(e) => {
                columns.push(Arc::new(StringArray::from(vec!["eval"])));
                columns.push(u(Some(e.step as u64)));
                columns.extend([f(Some(e.epoch)), f(None), f(None), f(None)]);
                for _ in 0..2 * teachers {
                    columns.push(f(None));
                }
                columns.extend([
                    f(None),
                    u(Some(e.rows as u64)),
                    u(None),
                    f(None),
                    f(Some(e.log_loss)),
                    f(Some(e.accuracy)),
                ]);
            }
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Reads one input batch into training rows, checking every value: a bad value is an
/// error naming the input row, its id and order, and the column.
fn read_rows(
    batch: &RecordBatch,
    first_row: usize,
    vocab: usize,
    teachers: &[String],
    seen: &mut HashSet<(String, String)>,
    out: &mut Vec<TrainRow>,
) -> Result<()> {
    let keys = row_keys(NAME, batch)?;
    let tokens = token_rows(NAME, batch, first_row, &keys, vocab)?;
    let column = |name: &str, to: &DataType| -> Result<Option<ArrayRef>> {
        batch
            .column_by_name(name)
            .map(|c| cast(c, to).map_err(DataFusionError::from))
            .transpose()
    };
    let labels = column(LABEL, &DataType::Int64)?
        .ok_or_else(|| input_error(NAME, "no column label".into()))?;
    let labels = labels.as_primitive::<Int64Type>();
    let weights = column(WEIGHT, &DataType::Float64)?;
    let splits = column(SPLIT, &DataType::Utf8)?;
    let list = super::logits_type();
    let teacher_columns = teachers
        .iter()
        .map(|t| column(t, &list).map(|c| c.expect("checked at planning")))
        .collect::<Result<Vec<_>>>()?;
    for (r, ((id, order), tokens)) in keys.into_iter().zip(tokens).enumerate() {
        let at = |col: &str, m: String| {
            input_error(
                NAME,
                format!(
                    "input row {} (id {id}, order {order}), column {col}: {m}",
                    first_row + r + 1
                ),
            )
        };
        if !seen.insert((id.clone(), order.clone())) {
            return Err(at(
                ORDER,
                "this (id, order) came before: each must come once".into(),
            ));
        }
        if labels.is_null(r) || !(0..=2).contains(&labels.value(r)) {
            let v = if labels.is_null(r) {
                "null".into()
            } else {
                labels.value(r).to_string()
            };
            return Err(at(LABEL, format!("{v} is not 0 (A), 1 (B) or 2 (tie)")));
        }
        let weight = match &weights {
            None => 1.0,
            Some(w) => {
                let w = w.as_primitive::<Float64Type>();
                if w.is_null(r) || !(w.value(r).is_finite() && w.value(r) >= 0.0) {
                    return Err(at(WEIGHT, "not a finite number >= 0".into()));
                }
                w.value(r)
            }
        };
        let dev = match &splits {
            None => false,
            Some(s) => {
                let s = s.as_string::<i32>();
                match (s.is_null(r), if s.is_null(r) { "" } else { s.value(r) }) {
                    (true, _) | (false, "train") => false,
                    (false, "dev") => true,
                    (false, other) => {
                        return Err(at(SPLIT, format!("{other:?} is not 'train' or 'dev'")))
                    }
                }
            }
        };
        let mut logits = Vec::with_capacity(teachers.len());
        for (name, c) in teachers.iter().zip(&teacher_columns) {
            let lists = c.as_list::<i32>();
            if lists.is_null(r) {
                return Err(at(
                    name,
                    "null: every training row needs this teacher's logits".into(),
                ));
            }
            let values = lists.value(r);
            let values = values.as_primitive::<Float32Type>();
            if values.len() != 3
                || values.null_count() > 0
                || values.values().iter().any(|v| !v.is_finite())
            {
                return Err(at(
                    name,
                    format!("{} values; 3 finite logits expected", values.len()),
                ));
            }
            logits.push([values.value(0), values.value(1), values.value(2)]);
        }
        out.push(TrainRow {
            id,
            order,
            input_ids: tokens,
            label: labels.value(r) as u32,
            weight,
            teachers: logits,
            dev,
        });
    }
    Ok(())
}

/// The figures of every `distill_step` run of an executed plan, in plan order.
pub fn training_figures(plan: &Arc<dyn ExecutionPlan>) -> Vec<TrainingStats> {
    crate::scaffold::find_operators::<DistillStep>(plan)
        .into_iter()
        .filter_map(|exec| exec.operator().figures())
        .collect()
}

/// On GPUs the ranks sum their gradients through NCCL (`train::nccl`), unless
/// `ARENAFLOW_NCCL=0` on any rank; where NCCL cannot be opened on every rank they all sum
/// through the host collective, and say so.
#[cfg(feature = "cuda")]
fn between_gpus(
    host: Box<dyn arenaflow_models::train::collective::Collective>,
    device: &candle_core::Device,
) -> Box<dyn arenaflow_models::train::collective::Collective> {
    if !device.is_cuda() {
        return host;
    }
    // Off on one rank is off on all: the handshake counts it as not ready.
    let wanted = !matches!(
        std::env::var("ARENAFLOW_NCCL").as_deref(),
        Ok("0") | Ok("off")
    );
    match arenaflow_models::train::nccl::NcclCollective::join(host, device, wanted) {
        Ok(nccl) => {
            eprintln!("{NAME}: gradients summed between the GPUs by NCCL");
            Box::new(nccl)
        }
        Err((e, host)) => {
            eprintln!("{NAME}: {e}; gradients summed through the host instead");
            host
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn between_gpus(
    host: Box<dyn arenaflow_models::train::collective::Collective>,
    _device: &candle_core::Device,
) -> Box<dyn arenaflow_models::train::collective::Collective> {
    host
}

/// This process's rank in a data-parallel run, from the launcher's environment (torchrun's
/// or SLURM's; `train::Rendezvous`); `None` alone.
pub fn data_parallel_rank() -> std::result::Result<Option<Rendezvous>, OperatorError> {
    Rendezvous::from_env(|k| std::env::var(k).ok()).map_err(OperatorError::from)
}

/// `ARENAFLOW_TEST_PAUSE_AFTER_STEPS=N`: after the checkpoint of step N, say so and stop
/// forever, so that a test can kill -9 the process at a known point. Unset in real runs.
fn pause_for_tests(step: usize) {
    let pause = std::env::var("ARENAFLOW_TEST_PAUSE_AFTER_STEPS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if pause == Some(step) {
        eprintln!("{NAME}: paused after step {step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

const USAGE: &str = "distill_step(table, model [, settings])";

/// The SQL table function.
#[derive(Debug)]
pub struct DistillStepFunction;

impl TableFunctionImpl for DistillStepFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let mut settings = TrainSettings::new(args.required_string(1, "model")?);
        if let Some(text) = args.string(2, "settings")? {
            settings.apply(&text).map_err(external)?;
        }
        settings.validate().map_err(external)?;
        arenaflow_models::device::check_device_name(&settings.device)
            .map_err(|e| external(e.into()))?;
        if settings.random_weights.is_none() {
            for file in arenaflow_models::checkpoint::model_files(&settings.model)
                .map_err(|e| external(e.into()))?
            {
                args.record_input(&file.display().to_string());
            }
        }
        if let Some(adapter) = &settings.init_adapter {
            args.record_input(&adapter.display().to_string());
        }
        let input = args.table(0)?;
        Ok(Arc::new(OperatorTable::try_new(
            DistillStep::new(settings),
            input,
        )?))
    }
}
