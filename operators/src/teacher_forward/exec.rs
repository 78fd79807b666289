//! The `teacher_forward` operator: streams tokenized rows (`id`, `order`, `input_ids`,
//! anything else) through a teacher and emits `id`, `order`, `logits` (3 x f32, not
//! probabilities) and the other columns except `input_ids`. Rows arrive sorted by (id,
//! order) (the plan sorts them), are sorted by length (within a window, or all at once) and
//! batched under a token budget, so the batches are a function of the rows alone. Inside a managed
//! output ([`ManagedOutput`]) each batch is committed to the resume folder before it goes
//! downstream, so a rerun after kill -9 computes only what is missing; the stream ends only
//! after every input (id, order) was emitted once. The pass's figures are plan metrics
//! ([`pass_figures`] reads them back).
//!
//! SQL: `teacher_forward(table, model [, adapter [, dtype [, device [, max_batch_tokens
//! [, sort_window [, padding [, adapter_mode]]]]]]])`; `adapter_mode` is `separate` (PEFT's
//! unmerged forward, the default) or `merged` (the adapter folded into the weights at load).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt32Array,
};
use datafusion::arrow::compute::{concat_batches, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::metrics::{
    BaselineMetrics, Count, ExecutionPlanMetricsSet, Gauge, MetricBuilder, MetricsSet, Time,
};
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;

use super::{ForwardStats, PaddingSide, Progress, Teacher, TeacherSettings};
use crate::args::Args;
use crate::commits::PartStore;
use crate::error::OperatorError;
use crate::run_state::ManagedOutput;
use crate::scaffold::{find_operators, Operator, OperatorExec, OperatorRun, OperatorTable};
use crate::token_rows::{input_error, row_keys, token_rows, RowKey, ID, INPUT_IDS, LOGITS, ORDER};

const NAME: &str = "teacher_forward";

fn external(e: OperatorError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// `id`, `order`, `logits`, then the input's other columns except `input_ids`.
pub fn output_schema(input: &Schema) -> Result<SchemaRef> {
    let field = |name: &str| match input.field_with_name(name) {
        Ok(f) => Ok(f.clone()),
        Err(_) => plan_err!("{NAME}: the input has no column {name}"),
    };
    let id = field(ID)?;
    if !(is_string(id.data_type()) || id.data_type().is_integer()) {
        return plan_err!(
            "{NAME}: column id is {}, not a string or integer",
            id.data_type()
        );
    }
    let order = field(ORDER)?;
    if !is_string(order.data_type()) {
        return plan_err!(
            "{NAME}: column order is {}, not a string ('ab' or 'ba')",
            order.data_type()
        );
    }
    let tokens = field(INPUT_IDS)?;
    match tokens.data_type() {
        DataType::List(item) | DataType::LargeList(item) if item.data_type().is_integer() => {}
        other => return plan_err!("{NAME}: column input_ids is {other}, not a list of token ids"),
    }
    if input.field_with_name(LOGITS).is_ok() {
        return plan_err!("{NAME}: the input already has a column logits");
    }
    let mut fields = vec![
        Arc::new(id),
        Arc::new(order),
        Arc::new(Field::new(LOGITS, teacher_logits_type(), false)),
    ];
    fields.extend(
        input
            .fields()
            .iter()
            .filter(|f| ![ID, ORDER, INPUT_IDS].contains(&f.name().as_str()))
            .cloned(),
    );
    Ok(Arc::new(Schema::new(fields)))
}

/// The teacher-forward operator: its settings. One output partition.
pub struct TeacherForward {
    pub settings: TeacherSettings,
}

impl fmt::Debug for TeacherForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.settings)
    }
}

/// The plan node of `teacher_forward`.
pub type TeacherForwardExec = OperatorExec<TeacherForward>;

impl Operator for TeacherForward {
    const NAME: &'static str = "TeacherForwardExec";

    fn output_schema(&self, input: &Schema) -> Result<SchemaRef> {
        output_schema(input)
    }

    fn single_partition(&self) -> bool {
        true
    }

    /// Batches are a function of the rows alone: rows come sorted by (id, order), then
    /// sort by length (stable), so any run and any kill + rerun forms the same batches.
    fn input_order(&self) -> &'static [&'static str] {
        &[ID, ORDER]
    }

    fn execute(&self, run: OperatorRun) -> Result<SendableRecordBatchStream> {
        let resume_dir = ManagedOutput::of(&run.context)
            .map(|output| output.resume_dir.join(self.resume_key(&run.input_plan)));
        let pass = Pass {
            settings: self.settings.clone(),
            schema: run.schema.clone(),
            resume_dir,
            metrics: PassMetrics::new(&run.metrics, run.partition),
        };
        let mut builder = RecordBatchReceiverStream::builder(run.schema, 2);
        let sender = builder.tx();
        let input = run.input;
        builder.spawn(async move { pass.run(input, sender).await });
        Ok(builder.build())
    }
}

impl TeacherForward {
    /// The resume subfolder of one pass: its settings and its input plan, hashed, so that
    /// two passes in one output never share commits.
    fn resume_key(&self, input: &Arc<dyn ExecutionPlan>) -> String {
        let input = datafusion::physical_plan::displayable(input.as_ref())
            .indent(false)
            .to_string();
        let text = format!("{:?}\n{input}", self.settings);
        format!(
            "{NAME}-{:016x}",
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        )
    }

    /// The figures of a finished pass from its plan metrics.
    pub fn figures(&self, metrics: &MetricsSet) -> ForwardStats {
        figures(&self.settings, |name| {
            let value = match name {
                OUTPUT_ROWS => metrics.output_rows(),
                _ => metrics.sum_by_name(name).map(|v| v.as_usize()),
            };
            value.unwrap_or(0) as u64
        })
    }
}

/// A pass's figures from its metric values by name.
fn figures(settings: &TeacherSettings, count: impl Fn(&str) -> u64) -> ForwardStats {
    let mut stats = ForwardStats {
        operator: NAME.into(),
        model: settings.model.clone(),
        device: settings.device.clone(),
        dtype: settings.dtype.clone(),
        rows: count(OUTPUT_ROWS),
        computed_rows: count(COMPUTED_ROWS),
        resumed_rows: count(RESUMED_ROWS),
        tokens: count(TOKENS),
        padded_tokens: count(PADDED_TOKENS),
        batches: count(BATCHES),
        peak_memory_bytes: Some(count(PEAK_MEMORY)).filter(|&b| b > 0),
        ..Default::default()
    };
    stats.finish(std::time::Duration::from_nanos(count(PASS_TIME)));
    stats
}

/// The figures of every `teacher_forward` pass of an executed plan, in plan order.
pub fn pass_figures(plan: &Arc<dyn ExecutionPlan>) -> Vec<ForwardStats> {
    find_operators::<TeacherForward>(plan)
        .into_iter()
        .map(|exec| exec.operator().figures(&exec.metrics_set()))
        .collect()
}

const OUTPUT_ROWS: &str = "output_rows";
const COMPUTED_ROWS: &str = "computed_rows";
const RESUMED_ROWS: &str = "resumed_rows";
const TOKENS: &str = "tokens";
const PADDED_TOKENS: &str = "padded_tokens";
const BATCHES: &str = "batches";
const PEAK_MEMORY: &str = "peak_memory_bytes";
/// Wall time of the pass after the model is loaded (and warmed up).
const PASS_TIME: &str = "pass_time";

/// The plan metrics of one pass (`EXPLAIN ANALYZE` shows them).
struct PassMetrics {
    baseline: BaselineMetrics,
    computed_rows: Count,
    resumed_rows: Count,
    tokens: Count,
    padded_tokens: Count,
    batches: Count,
    peak_memory: Gauge,
    pass_time: Time,
}

impl PassMetrics {
    fn new(metrics: &ExecutionPlanMetricsSet, partition: usize) -> Self {
        let count = |name: &'static str| MetricBuilder::new(metrics).counter(name, partition);
        Self {
            baseline: BaselineMetrics::new(metrics, partition),
            computed_rows: count(COMPUTED_ROWS),
            resumed_rows: count(RESUMED_ROWS),
            tokens: count(TOKENS),
            padded_tokens: count(PADDED_TOKENS),
            batches: count(BATCHES),
            peak_memory: MetricBuilder::new(metrics).gauge(PEAK_MEMORY, partition),
            pass_time: MetricBuilder::new(metrics).subset_time(PASS_TIME, partition),
        }
    }

    /// The value of the metric `name`.
    fn value(&self, name: &str) -> u64 {
        let value = match name {
            OUTPUT_ROWS => self.baseline.output_rows().value(),
            COMPUTED_ROWS => self.computed_rows.value(),
            RESUMED_ROWS => self.resumed_rows.value(),
            TOKENS => self.tokens.value(),
            PADDED_TOKENS => self.padded_tokens.value(),
            BATCHES => self.batches.value(),
            PEAK_MEMORY => self.peak_memory.value(),
            PASS_TIME => self.pass_time.value(),
            _ => 0,
        };
        value as u64
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<RecordBatch>>;

/// One execution of the operator: the running state.
struct Pass {
    settings: TeacherSettings,
    schema: SchemaRef,
    resume_dir: Option<PathBuf>,
    metrics: PassMetrics,
}

/// Rows waiting for the teacher: their other columns, concatenated once full. Rows
/// committed by an earlier run stay in the window (`done`), so that the batches are planned
/// over the same rows as in an uninterrupted run; a batch whose rows are all done is
/// skipped.
#[derive(Default)]
struct Window {
    batches: Vec<RecordBatch>,
    tokens: Vec<Vec<u32>>,
    done: Vec<bool>,
}

/// What a pass has done so far.
struct PassState {
    teacher: Arc<Teacher>,
    store: Option<PartStore>,
    progress: Progress,
    commits: usize,
    /// Input rows read so far.
    rows_read: usize,
    /// When the timed part of the pass began (after loading and the warm-up).
    started: Instant,
    warmed_up: bool,
}

impl Pass {
    async fn run(self, mut input: SendableRecordBatchStream, sender: Sender) -> Result<()> {
        arenaflow_models::device::reset_peak();
        let settings = self.settings.clone();
        let teacher = tokio::task::spawn_blocking(move || Teacher::load(&settings))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(external)?;
        let (store, committed) = match &self.resume_dir {
            Some(dir) => {
                let (store, batches) =
                    PartStore::open(dir, self.schema.clone()).map_err(external)?;
                (Some(store), batches)
            }
            None => (None, Vec::new()),
        };
        // Keys already committed -> seen again in this input.
        let mut done: HashMap<RowKey, bool> = HashMap::new();
        let mut resumed = 0u64;
        for batch in committed {
            for (id, order) in row_keys(NAME, &batch)? {
                if done.insert((id.clone(), order.clone()), false).is_some() {
                    return Err(input_error(NAME, format!(
                        "the resume folder holds id {id}, order {order} twice; remove it to start over"
                    )));
                }
            }
            resumed += batch.num_rows() as u64;
            self.metrics.resumed_rows.add(batch.num_rows());
            self.metrics.baseline.record_output(batch.num_rows());
            if sender.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
        if resumed > 0 {
            eprintln!("{NAME}: resuming after {resumed} committed rows");
        }
        let mut state = PassState {
            teacher: Arc::new(teacher),
            store,
            progress: Progress::new(NAME, 0, resumed),
            commits: 0,
            rows_read: 0,
            started: Instant::now(),
            warmed_up: !self.settings.warmup,
        };
        let mut seen: HashMap<RowKey, usize> = HashMap::new();
        let mut window = Window::default();
        let pass_schema = Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .filter(|f| f.name() != LOGITS)
                .cloned()
                .collect::<Vec<_>>(),
        ));
        while let Some(batch) = input.next().await {
            let batch = batch?;
            let keys = row_keys(NAME, &batch)?;
            let tokens = token_rows(
                NAME,
                &batch,
                state.rows_read,
                &keys,
                state.teacher.vocab_size(),
            )?;
            for ((key, row_tokens), r) in keys.into_iter().zip(tokens).zip(0..) {
                let row = state.rows_read + r + 1;
                if let Some(first) = seen.insert(key.clone(), row) {
                    return Err(input_error(NAME, format!(
                        "input rows {first} and {row} are both id {}, order {}: each (id, order) must come once",
                        key.0, key.1
                    )));
                }
                let committed = match done.get_mut(&key) {
                    Some(again) => {
                        *again = true;
                        true
                    }
                    None => false,
                };
                window.tokens.push(row_tokens);
                window.done.push(committed);
            }
            state.rows_read += batch.num_rows();
            let indices = pass_schema
                .fields()
                .iter()
                .map(|f| batch.schema().index_of(f.name()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            window.batches.push(batch.project(&indices)?);
            if self.settings.sort_window > 0 && window.tokens.len() >= self.settings.sort_window {
                let full = std::mem::take(&mut window);
                if !self
                    .forward_window(full, &pass_schema, &mut state, &sender)
                    .await?
                {
                    return Ok(());
                }
            }
        }
        if !self
            .forward_window(window, &pass_schema, &mut state, &sender)
            .await?
        {
            return Ok(());
        }
        state.progress.finish();
        if let Some(((id, order), _)) = done.iter().find(|(_, again)| !**again) {
            return Err(input_error(NAME, format!(
                "the resume folder {} holds id {id}, order {order}, which the input does not have: it is another pass's; remove it to start over",
                state.store.as_ref().map_or(String::new(), |s| s.dir().display().to_string())
            )));
        }
        let emitted = self.metrics.baseline.output_rows().value();
        if emitted != seen.len() {
            return Err(input_error(
                NAME,
                format!("emitted {emitted} rows for {} input rows", seen.len()),
            ));
        }
        self.metrics.pass_time.add_elapsed(state.started);
        let peak = arenaflow_models::device::peak_memory(state.teacher.model.device());
        self.metrics.peak_memory.set(peak.unwrap_or(0) as usize);
        let figures = figures(&self.settings, |name| self.metrics.value(name));
        eprintln!("{NAME}: {}", figures.summary());
        Ok(())
    }

    /// Runs one window of rows through the teacher, batch by batch. False when the
    /// consumer is gone.
    async fn forward_window(
        &self,
        window: Window,
        pass_schema: &SchemaRef,
        state: &mut PassState,
        sender: &Sender,
    ) -> Result<bool> {
        if window.done.iter().all(|&d| d) {
            return Ok(true);
        }
        let others = concat_batches(pass_schema, &window.batches)?;
        let lengths: Vec<usize> = window.tokens.iter().map(Vec::len).collect();
        let tokens = Arc::new(window.tokens);
        state.progress.set_total(state.rows_read as u64);
        // Planned over every row of the window, committed ones too: the batches of a rerun
        // are those of the uninterrupted run, so its logits are bitwise the same.
        let batches: Vec<Vec<usize>> = state
            .teacher
            .plan(&lengths)
            .into_iter()
            .filter(|members| members.iter().any(|&i| !window.done[i]))
            .collect();
        if !state.warmed_up {
            self.forward(&state.teacher, &tokens, batches[0].clone())
                .await?;
            state.warmed_up = true;
            arenaflow_models::device::reset_peak();
            state.started = Instant::now();
        }
        for members in batches {
            let logits = {
                let _timer = self.metrics.baseline.elapsed_compute().timer();
                self.forward(&state.teacher, &tokens, members.clone())
                    .await?
            };
            // A batch that an earlier run committed in part (it cannot, with the same
            // settings; the check keeps every (id, order) once) emits only the rest.
            let (members, logits): (Vec<usize>, Vec<[f32; 3]>) = members
                .into_iter()
                .zip(logits)
                .filter(|(i, _)| !window.done[*i])
                .unzip();
            let indices = UInt32Array::from(members.iter().map(|&i| i as u32).collect::<Vec<_>>());
            let taken = take_record_batch(&others, &indices)?;
            let flat: Vec<f32> = logits.iter().flatten().copied().collect();
            let logits: ArrayRef = Arc::new(FixedSizeListArray::try_new(
                Arc::new(Field::new_list_field(DataType::Float32, false)),
                3,
                Arc::new(Float32Array::from(flat)),
                None,
            )?);
            let columns = self
                .schema
                .fields()
                .iter()
                .map(|f| {
                    if f.name() == LOGITS {
                        Ok(logits.clone())
                    } else {
                        taken.column_by_name(f.name()).cloned().ok_or_else(|| {
                            DataFusionError::Internal(format!("{NAME}: lost column {}", f.name()))
                        })
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let out = RecordBatch::try_new(self.schema.clone(), columns)?;
            if let Some(store) = state.store.as_mut() {
                store.commit(&out).map_err(external)?;
                state.commits += 1;
                pause_for_tests(state.commits);
            }
            let real: usize = members.iter().map(|&i| lengths[i]).sum();
            let longest = members.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            self.metrics.computed_rows.add(members.len());
            self.metrics.tokens.add(real);
            self.metrics.padded_tokens.add(longest * members.len());
            self.metrics.batches.add(1);
            self.metrics.baseline.record_output(members.len());
            state.progress.advance(members.len() as u64, real as u64);
            if sender.send(Ok(out)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One forward batch on a blocking thread.
    async fn forward(
        &self,
        teacher: &Arc<Teacher>,
        rows: &Arc<Vec<Vec<u32>>>,
        members: Vec<usize>,
    ) -> Result<Vec<[f32; 3]>> {
        let (teacher, rows) = (teacher.clone(), rows.clone());
        tokio::task::spawn_blocking(move || {
            let slices: Vec<&[u32]> = members.iter().map(|&i| rows[i].as_slice()).collect();
            teacher.forward(&slices)
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(external)
    }
}

/// `ARENAFLOW_TEST_PAUSE_AFTER_COMMITS=N`: after the N-th commit, say so and stop forever,
/// so that a test can kill -9 the process at a known point. Unset in real runs.
fn pause_for_tests(commits: usize) {
    let pause = std::env::var("ARENAFLOW_TEST_PAUSE_AFTER_COMMITS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if pause == Some(commits) {
        eprintln!("{NAME}: paused after {commits} commits");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

const USAGE: &str = "teacher_forward(table, model [, adapter [, dtype [, device [, max_batch_tokens [, sort_window [, padding [, adapter_mode]]]]]]])";

/// The SQL table function.
/// The type of a teacher's `logits` column: 3 x f32, none null.
pub fn teacher_logits_type() -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new_list_field(DataType::Float32, false)), 3)
}

#[derive(Debug)]
pub struct TeacherForwardFunction;

/// The files of a model and an adapter whose contents key the output and its resume
/// folder: every file the model loads (config, weights, tokenizer_config; a hub id's
/// resolved snapshot), the adapter folder whole.
fn model_inputs(settings: &TeacherSettings) -> Result<Vec<PathBuf>> {
    let mut files = arenaflow_models::checkpoint::model_files(&settings.model)
        .map_err(|e| external(e.into()))?;
    if let Some(adapter) = &settings.adapter {
        files.push(adapter.clone());
    }
    Ok(files)
}

impl TableFunctionImpl for TeacherForwardFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let mut settings = TeacherSettings::new(args.required_string(1, "model")?);
        if let Some(adapter) = args.string(2, "adapter")? {
            settings.adapter = (!adapter.is_empty()).then(|| PathBuf::from(adapter));
        }
        if let Some(dtype) = args.string(3, "dtype")? {
            settings.dtype = dtype;
        }
        if let Some(device) = args.string(4, "device")? {
            settings.device = device;
        }
        if let Some(tokens) = args.count(5, "max_batch_tokens")? {
            settings.max_batch_tokens = tokens;
        }
        if let Some(window) = args.size(6, "sort_window")? {
            settings.sort_window = window;
        }
        if let Some(padding) = args.choice(
            7,
            "padding",
            &[("right", PaddingSide::Right), ("left", PaddingSide::Left)],
        )? {
            settings.padding = padding;
        }
        if let Some(merge) =
            args.choice(8, "adapter_mode", &[("separate", false), ("merged", true)])?
        {
            settings.merge_adapter = merge;
        }
        settings.validate().map_err(external)?;
        arenaflow_models::device::check_device_name(&settings.device)
            .map_err(|e| external(e.into()))?;
        for file in model_inputs(&settings)? {
            args.record_input(&file.display().to_string());
        }
        let input = args.table(0)?;
        Ok(Arc::new(OperatorTable::try_new(
            TeacherForward { settings },
            input,
        )?))
    }
}
