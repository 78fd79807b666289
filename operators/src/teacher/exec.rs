//! `TeacherForwardExec`: streams tokenized rows (`id`, `order`, `input_ids`, anything else)
//! through a teacher and emits `id`, `order`, `logits` (3 x f32, not probabilities) and the
//! other columns except `input_ids`. Rows are sorted by length (within a window, or all at
//! once) and batched under a token budget. Each batch is committed to the resume folder
//! the plan runner names before it goes downstream, so a rerun after kill -9 computes only
//! what is missing; the stream ends only after every input (id, order) was emitted once.
//!
//! SQL: `teacher_forward(table, model [, adapter [, dtype [, device [, max_batch_tokens
//! [, sort_window [, padding]]]]]])`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Float32Array, RecordBatch,
    UInt32Array,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{plan_err, DataFusionError, Result};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    displayable, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use super::parts::PartStore;
use super::{
    start_pass, ForwardEnv, ForwardStats, PaddingSide, Progress, Teacher, TeacherSettings,
};
use crate::error::OperatorError;
use crate::sql::{count_arg, project, resolve_table, size_arg, string_arg};
use crate::tokenize::exec::{InputHook, INPUT_IDS};

pub const ID: &str = "id";
pub const ORDER: &str = "order";
pub const LOGITS: &str = "logits";
const NAME: &str = "teacher_forward";

fn external(e: OperatorError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

fn input_error(message: String) -> DataFusionError {
    external(OperatorError::Input(format!("{NAME}: {message}")))
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
        Arc::new(Field::new(
            LOGITS,
            DataType::FixedSizeList(Arc::new(Field::new_list_field(DataType::Float32, false)), 3),
            false,
        )),
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

/// The teacher-forward operator over one child plan; one output partition.
#[derive(Debug)]
pub struct TeacherForwardExec {
    input: Arc<dyn ExecutionPlan>,
    settings: TeacherSettings,
    env: ForwardEnv,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for ForwardEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ForwardEnv")
    }
}

impl TeacherForwardExec {
    pub fn try_new(
        input: Arc<dyn ExecutionPlan>,
        settings: TeacherSettings,
        env: ForwardEnv,
    ) -> Result<Self> {
        let schema = output_schema(&input.schema())?;
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            input,
            settings,
            env,
            schema,
            properties,
        })
    }

    /// The resume subfolder of this operator: its settings and its input plan, hashed, so
    /// that two passes in one output never share commits.
    fn resume_key(&self) -> String {
        let input = displayable(self.input.as_ref()).indent(false).to_string();
        let text = format!("{:?}\n{input}", self.settings);
        format!(
            "{NAME}-{:016x}",
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        )
    }
}

impl DisplayAs for TeacherForwardExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "TeacherForwardExec: {:?}", self.settings)
    }
}

impl ExecutionPlan for TeacherForwardExec {
    fn name(&self) -> &str {
        "TeacherForwardExec"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.as_slice() {
            [child] => Ok(Arc::new(Self::try_new(
                child.clone(),
                self.settings.clone(),
                self.env.clone(),
            )?)),
            _ => plan_err!("TeacherForwardExec takes one child"),
        }
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return plan_err!("TeacherForwardExec has one partition, asked for {partition}");
        }
        let inputs = (0..self
            .input
            .properties()
            .output_partitioning()
            .partition_count())
            .map(|p| self.input.execute(p, context.clone()))
            .collect::<Result<Vec<_>>>()?;
        let input = futures::stream::select_all(inputs);
        let pass = Pass {
            settings: self.settings.clone(),
            schema: self.schema.clone(),
            resume_dir: self.env.resume_dir().map(|d| d.join(self.resume_key())),
            env: self.env.clone(),
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
        tokio::spawn(async move {
            let failed = sender.clone();
            if let Err(e) = pass.run(Box::pin(input), sender).await {
                let _ = failed.send(Err(e)).await;
            }
        });
        let stream = futures::stream::unfold(receiver, |mut r| async move {
            r.recv().await.map(|item| (item, r))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<RecordBatch>>;

/// One execution of the operator.
struct Pass {
    settings: TeacherSettings,
    schema: SchemaRef,
    resume_dir: Option<PathBuf>,
    env: ForwardEnv,
}

/// Rows waiting for the teacher: their other columns, concatenated once full.
struct Window {
    batches: Vec<RecordBatch>,
    tokens: Vec<Vec<u32>>,
}

impl Pass {
    async fn run(
        self,
        mut input: std::pin::Pin<Box<dyn futures::Stream<Item = Result<RecordBatch>> + Send>>,
        sender: Sender,
    ) -> Result<()> {
        let started = start_pass();
        let settings = self.settings.clone();
        let teacher = tokio::task::spawn_blocking(move || Teacher::load(&settings))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(external)?;
        let teacher = Arc::new(teacher);
        let (mut store, committed) = match &self.resume_dir {
            Some(dir) => {
                let (store, batches) =
                    PartStore::open(dir, self.schema.clone()).map_err(external)?;
                (Some(store), batches)
            }
            None => (None, Vec::new()),
        };
        // Keys already committed: (id, order) -> seen again in this input.
        let mut done: HashMap<(String, String), bool> = HashMap::new();
        let mut stats = ForwardStats {
            operator: NAME.into(),
            model: self.settings.model.clone(),
            dtype: self.settings.dtype.clone(),
            ..Default::default()
        };
        for batch in committed {
            for (id, order) in keys(&batch)? {
                if done.insert((id.clone(), order.clone()), false).is_some() {
                    return Err(input_error(format!(
                        "the resume folder holds id {id}, order {order} twice; remove it to start over"
                    )));
                }
            }
            stats.resumed_rows += batch.num_rows() as u64;
            if sender.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
        if stats.resumed_rows > 0 {
            eprintln!(
                "{NAME}: resuming after {} committed rows",
                stats.resumed_rows
            );
        }
        let mut progress = Progress::new(NAME, 0, stats.resumed_rows);
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        let mut window = Window {
            batches: Vec::new(),
            tokens: Vec::new(),
        };
        let mut row_number = 0usize;
        let pass_schema = Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .filter(|f| f.name() != LOGITS)
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let mut commits = 0usize;
        while let Some(batch) = input.next().await {
            let batch = batch?;
            let ids = keys(&batch)?;
            let tokens = token_rows(&batch, row_number, &ids, teacher.vocab_size())?;
            let mut keep = Vec::with_capacity(batch.num_rows());
            for ((key, row_tokens), r) in ids.into_iter().zip(tokens).zip(0..) {
                let row = row_number + r + 1;
                if let Some(first) = seen.insert(key.clone(), row) {
                    return Err(input_error(format!(
                        "input rows {first} and {row} are both id {}, order {}: each (id, order) must come once",
                        key.0, key.1
                    )));
                }
                match done.get_mut(&key) {
                    Some(again) => {
                        *again = true;
                        keep.push(false);
                    }
                    None => {
                        keep.push(true);
                        window.tokens.push(row_tokens);
                    }
                }
            }
            row_number += batch.num_rows();
            let kept = filter_record_batch(&batch, &BooleanArray::from(keep))?;
            let indices = pass_schema
                .fields()
                .iter()
                .map(|f| kept.schema().index_of(f.name()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            window.batches.push(kept.project(&indices)?);
            if self.settings.sort_window > 0 && window.tokens.len() >= self.settings.sort_window {
                let full = std::mem::replace(
                    &mut window,
                    Window {
                        batches: Vec::new(),
                        tokens: Vec::new(),
                    },
                );
                if !self
                    .forward_window(
                        &teacher,
                        full,
                        &pass_schema,
                        &mut store,
                        &sender,
                        &mut stats,
                        &mut progress,
                        &mut commits,
                        row_number as u64,
                    )
                    .await?
                {
                    return Ok(());
                }
            }
        }
        if !self
            .forward_window(
                &teacher,
                window,
                &pass_schema,
                &mut store,
                &sender,
                &mut stats,
                &mut progress,
                &mut commits,
                row_number as u64,
            )
            .await?
        {
            return Ok(());
        }
        progress.finish();
        if let Some(((id, order), _)) = done.iter().find(|(_, again)| !**again) {
            return Err(input_error(format!(
                "the resume folder {} holds id {id}, order {order}, which the input does not have: it is another pass's; remove it to start over",
                store.as_ref().map_or(String::new(), |s| s.dir().display().to_string())
            )));
        }
        stats.rows = stats.resumed_rows + stats.computed_rows;
        if stats.rows != seen.len() as u64 {
            return Err(input_error(format!(
                "emitted {} rows for {} input rows",
                stats.rows,
                seen.len()
            )));
        }
        stats.finish(&teacher.device, started.elapsed());
        eprintln!("{NAME}: {}", stats.summary());
        self.env.record(stats);
        Ok(())
    }

    /// Runs one window of rows through the teacher, batch by batch. False when the
    /// consumer is gone.
    #[allow(clippy::too_many_arguments)]
    async fn forward_window(
        &self,
        teacher: &Arc<Teacher>,
        window: Window,
        pass_schema: &SchemaRef,
        store: &mut Option<PartStore>,
        sender: &Sender,
        stats: &mut ForwardStats,
        progress: &mut Progress,
        commits: &mut usize,
        rows_seen: u64,
    ) -> Result<bool> {
        if window.tokens.is_empty() {
            return Ok(true);
        }
        let others = concat_batches(pass_schema, &window.batches)?;
        let lengths: Vec<usize> = window.tokens.iter().map(Vec::len).collect();
        let tokens = Arc::new(window.tokens);
        progress.set_total(rows_seen);
        for members in teacher.plan(&lengths) {
            let (t, rows, m) = (teacher.clone(), tokens.clone(), members.clone());
            let logits = tokio::task::spawn_blocking(move || {
                let slices: Vec<&[u32]> = m.iter().map(|&i| rows[i].as_slice()).collect();
                t.forward(&slices)
            })
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(external)?;
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
            if let Some(store) = store.as_mut() {
                store.commit(&out).map_err(external)?;
                *commits += 1;
                pause_for_tests(*commits);
            }
            let real: usize = members.iter().map(|&i| lengths[i]).sum();
            let longest = members.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            stats.computed_rows += members.len() as u64;
            stats.tokens += real as u64;
            stats.padded_tokens += (longest * members.len()) as u64;
            stats.batches += 1;
            progress.advance(members.len() as u64, real as u64);
            if sender.send(Ok(out)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
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

/// The (id, order) of every row.
fn keys(batch: &RecordBatch) -> Result<Vec<(String, String)>> {
    let column = |name: &str| -> Result<ArrayRef> {
        let c = batch
            .column_by_name(name)
            .ok_or_else(|| input_error(format!("no column {name}")))?;
        Ok(cast(c, &DataType::Utf8)?)
    };
    let (ids, orders) = (column(ID)?, column(ORDER)?);
    let (ids, orders) = (ids.as_string::<i32>(), orders.as_string::<i32>());
    (0..batch.num_rows())
        .map(|r| {
            if ids.is_null(r) {
                return Err(input_error(format!("a row has a null id (batch row {r})")));
            }
            let order = if orders.is_null(r) {
                ""
            } else {
                orders.value(r)
            };
            if order != "ab" && order != "ba" {
                return Err(input_error(format!(
                    "id {}, column order: {order:?} is not 'ab' or 'ba'",
                    ids.value(r)
                )));
            }
            Ok((ids.value(r).to_string(), order.to_string()))
        })
        .collect()
}

/// Every row's token ids, checked against the vocabulary.
fn token_rows(
    batch: &RecordBatch,
    first_row: usize,
    keys: &[(String, String)],
    vocab_size: usize,
) -> Result<Vec<Vec<u32>>> {
    let column = batch
        .column_by_name(INPUT_IDS)
        .ok_or_else(|| input_error(format!("no column {INPUT_IDS}")))?;
    let list_type = DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true)));
    let lists = cast(column, &list_type)?;
    let lists = lists.as_list::<i32>();
    let mut rows = Vec::with_capacity(batch.num_rows());
    for (r, (id, order)) in keys.iter().enumerate() {
        let at = |m: String| {
            input_error(format!(
                "input row {} (id {id}, order {order}), column input_ids: {m}",
                first_row + r + 1
            ))
        };
        if lists.is_null(r) {
            return Err(at("null".into()));
        }
        let values = lists.value(r);
        let values = values.as_primitive::<Int32Type>();
        if values.is_empty() {
            return Err(at("no tokens".into()));
        }
        let mut tokens = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(t) if t >= 0 && (t as usize) < vocab_size => tokens.push(t as u32),
                Some(t) => {
                    return Err(at(format!(
                        "token {t} at position {i} is outside the vocabulary (0..{vocab_size})"
                    )))
                }
                None => return Err(at(format!("null token at position {i}"))),
            }
        }
        rows.push(tokens);
    }
    Ok(rows)
}

const USAGE: &str = "teacher_forward(table, model [, adapter [, dtype [, device [, max_batch_tokens [, sort_window [, padding]]]]]])";

/// The SQL table function.
pub struct TeacherForwardFunction {
    state: Weak<parking_lot::RwLock<datafusion::execution::context::SessionState>>,
    on_input: InputHook,
    env: ForwardEnv,
}

impl fmt::Debug for TeacherForwardFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TeacherForwardFunction")
    }
}

/// The files of a model and an adapter whose hashes key the output: a folder's config and
/// index (the weight shards are named by the index; hashing tens of GB each run would cost
/// minutes), a GGUF file whole, an adapter whole.
fn model_inputs(settings: &TeacherSettings) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let model = Path::new(&settings.model);
    if model.is_dir() {
        for name in ["config.json", "model.safetensors.index.json"] {
            if model.join(name).is_file() {
                files.push(model.join(name));
            }
        }
    } else if model.is_file() {
        files.push(model.to_path_buf());
    }
    if let Some(adapter) = &settings.adapter {
        files.push(adapter.clone());
    }
    files
}

impl TableFunctionImpl for TeacherForwardFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if !(2..=8).contains(&exprs.len()) {
            return plan_err!("{USAGE}: got {} arguments", exprs.len());
        }
        let table = string_arg(NAME, "table", &exprs[0])?;
        let mut settings = TeacherSettings::new(string_arg(NAME, "model", &exprs[1])?);
        if let Some(e) = exprs.get(2) {
            let adapter = string_arg(NAME, "adapter", e)?;
            settings.adapter = (!adapter.is_empty()).then(|| PathBuf::from(adapter));
        }
        if let Some(e) = exprs.get(3) {
            settings.dtype = string_arg(NAME, "dtype", e)?;
        }
        if let Some(e) = exprs.get(4) {
            settings.device = string_arg(NAME, "device", e)?;
        }
        if let Some(e) = exprs.get(5) {
            settings.max_batch_tokens = count_arg(NAME, "max_batch_tokens", e)?;
        }
        if let Some(e) = exprs.get(6) {
            settings.sort_window = size_arg(NAME, "sort_window", e)?;
        }
        if let Some(e) = exprs.get(7) {
            settings.padding = match string_arg(NAME, "padding", e)?.as_str() {
                "right" => PaddingSide::Right,
                "left" => PaddingSide::Left,
                other => {
                    return plan_err!("{NAME}: padding must be 'right' or 'left', got {other:?}")
                }
            };
        }
        settings.validate().map_err(external)?;
        arenaflow_models::device::check_device_name(&settings.device)
            .map_err(|e| external(e.into()))?;
        for file in model_inputs(&settings) {
            (self.on_input)(&file.display().to_string());
        }
        let input = resolve_table(NAME, &self.state, &table)?;
        let schema = output_schema(&input.schema())?;
        Ok(Arc::new(TeacherForwardTable {
            input,
            settings,
            env: self.env.clone(),
            schema,
        }))
    }
}

#[derive(Debug)]
struct TeacherForwardTable {
    input: Arc<dyn TableProvider>,
    settings: TeacherSettings,
    env: ForwardEnv,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for TeacherForwardTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = self.input.scan(state, None, &[], None).await?;
        project(
            Arc::new(TeacherForwardExec::try_new(
                input,
                self.settings.clone(),
                self.env.clone(),
            )?),
            projection,
        )
    }
}

/// Registers `teacher_forward`; `on_input` hears of the model and adapter files, `env`
/// carries the resume folder and the figures between the runner and the operator.
pub fn register(ctx: &SessionContext, on_input: InputHook, env: ForwardEnv) {
    ctx.register_udtf(
        NAME,
        Arc::new(TeacherForwardFunction {
            state: ctx.state_weak_ref(),
            on_input,
            env,
        }),
    );
}
