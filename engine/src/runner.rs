//! Runs a plan file statement by statement. `COPY ... TO` a path inside the run directory
//! is managed: written to a staging folder, counted, recorded in the manifest as
//! `writing`, moved into place, then recorded `complete`; an output already complete with
//! the same fingerprint is skipped.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use arenaflow_operators::run_state::ManagedOutput;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Int64Type, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::{col, DdlStatement, LogicalPlan};
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions};
use datafusion::sql::parser::{CopyToStatement, DFParser, Statement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{EngineError, Result};
use crate::lock::Lock;
use crate::manifest::{Manifest, OutputRecord, OutputStatus};
use crate::plan::{PlanFile, PlanStatement, RUN_DIR_PARAM, SHARD_COUNT_PARAM, SHARD_INDEX_PARAM};
use crate::session::{execute, ArenaSession};
use crate::storage::{
    delete_tree, hash_location, hash_output, move_tree, objects_under, output_changes, sha256_hex,
    InputFile, Location,
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub run_dir: String,
    pub sets: Vec<(String, String)>,
    /// Overwrite outputs that belong to another stage or other parameters.
    pub force: bool,
    pub shard: Shard,
}

/// One shard of an array job: `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Shard {
    /// `i/n`, with 0 <= i < n.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            EngineError::Invalid(format!(
                "--shard {text:?}: expected i/n with 0 <= i < n, e.g. 0/4"
            ))
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<u32>().map_err(|_| bad())?,
            n.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// From a SLURM array job's environment: SLURM_ARRAY_TASK_ID (less
    /// SLURM_ARRAY_TASK_MIN, so `--array=1-4` works) of SLURM_ARRAY_TASK_COUNT.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let (Some(id), Some(count)) = (var("SLURM_ARRAY_TASK_ID"), var("SLURM_ARRAY_TASK_COUNT"))
        else {
            return Ok(None);
        };
        let number = |name: &str, v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| EngineError::Invalid(format!("{name}={v:?} is not a task number")))
        };
        let id = number("SLURM_ARRAY_TASK_ID", &id)?;
        let min = match var("SLURM_ARRAY_TASK_MIN") {
            Some(m) => number("SLURM_ARRAY_TASK_MIN", &m)?,
            None => 0,
        };
        let count = number("SLURM_ARRAY_TASK_COUNT", &count)?;
        let index = id.checked_sub(min).filter(|&i| i < count).ok_or_else(|| {
            EngineError::Invalid(format!(
                "SLURM array task {id} (first {min}) is not one of {count} tasks: use a contiguous --array range, or pass --shard"
            ))
        })?;
        Ok(Some(Self { index, count }))
    }

    /// The name of this shard's manifest file.
    pub fn writer(&self) -> Option<String> {
        (self.count > 1).then(|| format!("shard-{}-of-{}", self.index, self.count))
    }
}

/// What a run did with each managed output.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub written: Vec<String>,
    pub up_to_date: Vec<String>,
}

struct PlanRun<'a> {
    session: &'a ArenaSession,
    /// Whose records this run writes: `main` or a shard's name (the lock it holds).
    writer: String,
    plan: &'a PlanFile,
    options: &'a RunOptions,
    run_dir: Location,
    params: BTreeMap<String, String>,
    manifest: Manifest,
    input_hashes: HashMap<String, Vec<InputFile>>,
    summary: RunSummary,
    /// The run directory's lock, checked before each manifest write.
    lock: &'a Lock,
}

/// Runs a plan; query results print to `out`.
pub async fn run_plan(
    session: &ArenaSession,
    plan: &PlanFile,
    options: &RunOptions,
    out: &mut dyn Write,
) -> Result<RunSummary> {
    let params = plan.resolve(&options.sets)?;
    if options.shard.count > 1 && !plan.uses_shard() {
        return Err(EngineError::Invalid(format!(
            "{}: runs as shard {}/{}, but the plan does not split its rows by ${{{SHARD_INDEX_PARAM}}}: every shard would write the same outputs",
            plan.file, options.shard.index, options.shard.count
        )));
    }
    session.register_stores_for(&options.run_dir)?;
    let run_dir = Location::parse(&options.run_dir)?;
    // Held until the plan is done: no other run writes these records meanwhile, so what
    // an earlier run of this writer left half-written is nobody's.
    let writer = options.shard.writer().unwrap_or_else(|| "main".into());
    let lock = Lock::acquire(&session.ctx, &run_dir, &writer).await?;
    let result = run_locked(session, plan, options, run_dir, writer, params, &lock, out).await;
    let released = lock.release().await;
    let summary = result?;
    released?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
async fn run_locked(
    session: &ArenaSession,
    plan: &PlanFile,
    options: &RunOptions,
    run_dir: Location,
    writer: String,
    params: BTreeMap<String, String>,
    lock: &Lock,
    out: &mut dyn Write,
) -> Result<RunSummary> {
    remove_leftover_staging(&session.ctx, &run_dir, &writer).await?;
    let manifest = Manifest::load(&session.ctx, &run_dir, options.shard.writer()).await?;
    let mut run = PlanRun {
        session,
        writer,
        plan,
        options,
        run_dir,
        params,
        manifest,
        input_hashes: HashMap::new(),
        summary: RunSummary::default(),
        lock,
    };
    let run_dir_value = options.run_dir.trim_end_matches('/').to_string();
    // Defaults may name the run directory (`-- param input = ${run_dir}/prepare/...`).
    let mut values: BTreeMap<String, String> = run
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("${run_dir}", &run_dir_value)))
        .collect();
    values.insert(RUN_DIR_PARAM.to_string(), run_dir_value);
    values.insert(
        SHARD_INDEX_PARAM.to_string(),
        options.shard.index.to_string(),
    );
    values.insert(
        SHARD_COUNT_PARAM.to_string(),
        options.shard.count.to_string(),
    );
    for statement in &plan.statements {
        let sql = plan.substitute(statement, &values)?;
        run.statement(statement, &sql, out)
            .await
            .map_err(|e| match e {
                EngineError::Plan { .. } | EngineError::Statement { .. } => e,
                other => EngineError::Statement {
                    file: plan.file.clone(),
                    line: statement.line,
                    error: Box::new(with_plan_line(other, statement.line)),
                },
            })?;
    }
    Ok(run.summary)
}

/// Where managed outputs are written before they are moved into place.
const STAGING_DIR: &str = ".staging";

/// Removes the staging folders an earlier run of `writer` left (killed during a COPY) in
/// the run directory. Called with `writer`'s lock held: no live run owns them. Folders of
/// the format before writers named them (a bare UUID) go with the main writer's.
async fn remove_leftover_staging(
    ctx: &datafusion::prelude::SessionContext,
    run_dir: &Location,
    writer: &str,
) -> Result<()> {
    let root = run_dir.join(STAGING_DIR);
    let store = root.store(ctx)?;
    let mut leftovers = std::collections::BTreeSet::new();
    for object in objects_under(store.as_ref(), &root).await? {
        let Some(folder) = object
            .location
            .prefix_match(&root.path)
            .and_then(|mut parts| parts.next())
        else {
            continue;
        };
        let name = folder.as_ref().to_string();
        if staged_by(&name, writer) {
            leftovers.insert(name);
        }
    }
    for name in leftovers {
        delete_tree(store.as_ref(), &root.join(&name)).await?;
    }
    if root.is_local() {
        // Empty folders hold no objects; remove this writer's too.
        if let Ok(entries) = std::fs::read_dir(root.sql()) {
            for entry in entries.flatten() {
                if staged_by(&entry.file_name().to_string_lossy(), writer) {
                    std::fs::remove_dir_all(entry.path()).map_err(|e| {
                        EngineError::Invalid(format!("{}: {e}", entry.path().display()))
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// Whether the staging folder `name` is `writer`'s (`{writer}-{uuid}`, or a bare UUID of
/// the main writer from before writers named their folders).
fn staged_by(name: &str, writer: &str) -> bool {
    name.starts_with(&format!("{writer}-"))
        || (writer == "main" && uuid::Uuid::parse_str(name).is_ok())
}

/// What a resume folder is for, written into it (`output.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResumeOwner {
    output: String,
    writer: String,
    fingerprint: String,
}

const RESUME_OWNER: &str = "output.json";

/// Parser errors count lines from the statement's start; add the plan file's line.
fn with_plan_line(error: EngineError, statement_line: usize) -> EngineError {
    let message = error.to_string();
    match message.find("Line: ").and_then(|at| {
        message[at + 6..]
            .split(',')
            .next()?
            .trim()
            .parse::<usize>()
            .ok()
    }) {
        Some(line) => EngineError::Invalid(format!(
            "{message} (plan line {})",
            statement_line + line - 1
        )),
        None => error,
    }
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

impl PlanRun<'_> {
    async fn statement(
        &mut self,
        statement: &PlanStatement,
        sql: &str,
        out: &mut dyn Write,
    ) -> Result<()> {
        self.session.register_stores_for(sql)?;
        let mut parsed = DFParser::parse_sql(sql)?;
        if parsed.len() != 1 {
            return Err(EngineError::Invalid(format!(
                "expected one statement, found {}",
                parsed.len()
            )));
        }
        let parsed = parsed.pop_front().unwrap_or_else(|| unreachable!());
        if let Statement::CopyTo(copy) = &parsed {
            let target = Location::parse(&copy.target)?;
            if let Some(key) = target.relative_to(&self.run_dir) {
                return self.managed_copy(statement, copy.clone(), key, out).await;
            }
        }
        let prints = matches!(&parsed, Statement::Statement(s) if matches!(**s, SqlStatement::Query(_) | SqlStatement::ShowTables { .. } | SqlStatement::ShowColumns { .. }))
            || matches!(parsed, Statement::Explain(_));
        let state = self.session.ctx.state();
        let logical = state.statement_to_plan(parsed).await?;
        if let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(table)) = &logical {
            for location in &table.locations {
                self.session.inputs.record(location);
            }
        }
        let bar = spinner(format!("{}:{}", self.plan.file, statement.line));
        let batches = self
            .session
            .ctx
            .execute_logical_plan(logical)
            .await?
            .collect()
            .await;
        bar.finish_and_clear();
        let batches = batches?;
        if prints {
            writeln!(
                out,
                "{}",
                pretty_format_batches(&batches)
                    .map_err(datafusion::error::DataFusionError::from)?
            )?;
        }
        Ok(())
    }

    async fn inputs(&mut self) -> Result<Vec<InputFile>> {
        let mut all = Vec::new();
        for location in self.session.inputs.locations() {
            if !self.input_hashes.contains_key(&location) {
                let parsed = Location::parse(&location)?;
                let files =
                    hash_location(parsed.store(&self.session.ctx)?.as_ref(), &parsed).await?;
                if files.is_empty() {
                    return Err(EngineError::Invalid(format!(
                        "input {location}: no such file or folder"
                    )));
                }
                self.input_hashes.insert(location.clone(), files);
            }
            all.extend(self.input_hashes[&location].iter().cloned());
        }
        Ok(all)
    }

    async fn managed_copy(
        &mut self,
        statement: &PlanStatement,
        mut copy: CopyToStatement,
        key: String,
        out: &mut dyn Write,
    ) -> Result<()> {
        let ctx = &self.session.ctx;
        let target = self.run_dir.join(&key);
        let store = target.store(ctx)?;
        let staging_root = self.run_dir.join(&format!(
            "{STAGING_DIR}/{}-{}",
            self.writer,
            uuid::Uuid::new_v4()
        ));
        let staging = staging_root.join(&key);
        let folder = copy.target.ends_with('/') || !copy.partitioned_by.is_empty();
        copy.target = if folder {
            format!("{}/", staging.sql())
        } else {
            staging.sql()
        };
        let format = copy
            .stored_as
            .clone()
            .unwrap_or_else(|| key.rsplit('.').next().unwrap_or("parquet").to_string())
            .to_lowercase();
        // Planning the query is what tells the table functions (readers, tokenize) which
        // files it reads; the fingerprint needs them before anything runs. The plan (into
        // the staging folder) is kept and run below, so nothing is planned twice.
        let logical = ctx
            .state()
            .statement_to_plan(Statement::CopyTo(copy))
            .await?;
        let inputs = self.inputs().await?;
        let plan_sha256 = sha256_hex(&self.plan.text);
        let params_sha256 = sha256_hex(serde_json::to_vec(&self.params)?);
        let input_digest: Vec<&str> = inputs.iter().map(|i| i.sha256.as_str()).collect();
        let fingerprint = sha256_hex(format!(
            "{}\n{key}\n{plan_sha256}\n{params_sha256}\n{}",
            self.plan.stage,
            input_digest.join(",")
        ));
        let conflict = |message: String| EngineError::Manifest {
            run_dir: self.run_dir.to_string(),
            message,
        };

        match self.manifest.outputs.get(&key) {
            Some(record)
                if record.status == OutputStatus::Complete && record.fingerprint == fingerprint =>
            {
                let now = hash_output(store.as_ref(), &self.run_dir, &target).await?;
                let changes = if record.files.is_empty() && record.rows > 0 {
                    vec!["its record has no file hashes (written by an older arenaflow)".into()]
                } else {
                    output_changes(&record.files, &now)
                };
                if changes.is_empty() {
                    writeln!(
                        out,
                        "up to date: {key} ({} rows, {} ids); nothing to do",
                        record.rows,
                        record.distinct_ids.map_or("-".into(), |n| n.to_string())
                    )?;
                    self.summary.up_to_date.push(key);
                    return Ok(());
                }
                if !self.options.force {
                    return Err(conflict(format!(
                        "{key} is recorded complete, but {}; pass --force to make it again",
                        changes.join("; ")
                    )));
                }
                writeln!(out, "making {key} again: {}", changes.join("; "))?;
            }
            Some(record)
                if record.status == OutputStatus::Complete
                    && !self.options.force
                    && (record.stage != self.plan.stage || record.params != self.params) =>
            {
                return Err(conflict(format!(
                    "{key} is the output of stage {} with parameters {:?}; this run (stage {}, parameters {:?}) would overwrite it. Put what differs into the output path, or pass --force",
                    record.stage, record.params, self.plan.stage, self.params
                )));
            }
            Some(_) => {}
            None => {
                let present = !objects_under(store.as_ref(), &target).await?.is_empty();
                if present && !self.options.force {
                    return Err(conflict(format!("{key} exists but the manifest does not record it; remove it or pass --force")));
                }
            }
        }
        if let Some(other) = self.manifest.outputs.keys().find(|k| {
            *k != &key && (k.starts_with(&format!("{key}/")) || key.starts_with(&format!("{k}/")))
        }) {
            if !self.options.force {
                return Err(conflict(format!(
                    "{key} overlaps the recorded output {other}; pass --force to overwrite"
                )));
            }
        }

        // Model operators commit batch by batch here, so that a rerun after kill -9 goes
        // on where it stopped; the folder is keyed by the fingerprint. Model artifacts go
        // into the staging folder, to be recorded and moved with the output.
        let resume_dir = self.resume_dir(&fingerprint);
        self.claim_resume_dir(&resume_dir, &key, &fingerprint, out)?;
        let mut state = ctx.state();
        state.config_mut().set_extension(Arc::new(ManagedOutput {
            resume_dir: resume_dir.clone(),
            artifact_dir: staging.sql(),
        }));
        let bar = spinner(format!("{}:{} -> {key}", self.plan.file, statement.line));
        let written = async {
            let executed = execute(state, logical).await?;
            let rows = copied_rows(&executed.batches)?;
            let distinct_ids = if rows == 0 {
                Some(0)
            } else {
                self.distinct_ids(&staging, &format, folder).await?
            };
            let mut metrics = executed
                .passes
                .iter()
                .map(serde_json::to_value)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            for training in &executed.trainings {
                metrics.push(serde_json::to_value(training)?);
            }
            Ok::<_, EngineError>((rows, distinct_ids, metrics))
        }
        .await;
        bar.finish_and_clear();
        let (rows, distinct_ids, metrics) = match written {
            Ok(v) => v,
            Err(e) => {
                let _ = delete_tree(store.as_ref(), &staging_root).await;
                return Err(e);
            }
        };

        let mut record = OutputRecord {
            status: OutputStatus::Writing,
            stage: self.plan.stage.clone(),
            plan: self.plan.file.clone(),
            line: statement.line,
            format,
            params: self.params.clone(),
            rows,
            distinct_ids,
            plan_sha256,
            params_sha256,
            inputs,
            files: Vec::new(),
            skipped_rows: self.session.inputs.skipped_rows(),
            fingerprint,
            written_at: chrono::Utc::now().to_rfc3339(),
            metrics,
        };
        self.manifest.record(&key, record.clone());
        self.lock.check()?;
        self.manifest.save(ctx, &self.run_dir).await?;
        delete_tree(store.as_ref(), &target).await?;
        move_tree(store.as_ref(), &staging, &target).await?;
        delete_tree(store.as_ref(), &staging_root).await?;
        record.files = hash_output(store.as_ref(), &self.run_dir, &target).await?;
        record.status = OutputStatus::Complete;
        self.manifest.record(&key, record);
        self.lock.check()?;
        self.manifest.save(ctx, &self.run_dir).await?;
        if resume_dir.exists() {
            std::fs::remove_dir_all(&resume_dir)
                .map_err(|e| EngineError::Invalid(format!("{}: {e}", resume_dir.display())))?;
        }
        writeln!(
            out,
            "wrote {key}: {rows} rows, {} ids",
            distinct_ids.map_or("-".into(), |n| n.to_string())
        )?;
        self.summary.written.push(key);
        Ok(())
    }

    /// Takes `dir` as the resume folder of output `key`: removes the resume folders this
    /// writer left for `key` under other inputs or settings (no live run owns them: this
    /// run holds the writer's lock; they could never be resumed), and says in `dir` whose
    /// it is.
    fn claim_resume_dir(
        &self,
        dir: &std::path::Path,
        key: &str,
        fingerprint: &str,
        out: &mut dyn Write,
    ) -> Result<()> {
        let io = |path: &std::path::Path, e: std::io::Error| {
            EngineError::Invalid(format!("{}: {e}", path.display()))
        };
        // Under a local run directory only: the temporary folder of a remote one is shared
        // by every run directory on the node.
        let siblings = dir.parent().filter(|_| self.run_dir.is_local());
        if let Some(Ok(entries)) = siblings.map(std::fs::read_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path == dir {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(path.join(RESUME_OWNER)) else {
                    continue;
                };
                let Ok(owner) = serde_json::from_str::<ResumeOwner>(&text) else {
                    continue;
                };
                if owner.output == key && owner.writer == self.writer {
                    std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
                    writeln!(
                        out,
                        "removed {}: the commits of an earlier run of {key} with other inputs or settings",
                        path.display()
                    )?;
                }
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let owner = ResumeOwner {
            output: key.to_string(),
            writer: self.writer.clone(),
            fingerprint: fingerprint.to_string(),
        };
        let path = dir.join(RESUME_OWNER);
        std::fs::write(&path, serde_json::to_vec_pretty(&owner)?).map_err(|e| io(&path, e))?;
        Ok(())
    }

    /// The local folder where model operators commit their batches for one output: under
    /// the run directory when it is local, else in the system's temporary folder (a node's
    /// own disk: a rerun on another node starts over).
    fn resume_dir(&self, fingerprint: &str) -> std::path::PathBuf {
        let name = &fingerprint[..16.min(fingerprint.len())];
        if self.run_dir.is_local() {
            std::path::Path::new(&self.run_dir.sql())
                .join(".resume")
                .join(name)
        } else {
            std::env::temp_dir().join("arenaflow-resume").join(name)
        }
    }

    /// Distinct `id` values of a written output, read back from where it was written.
    async fn distinct_ids(
        &self,
        staging: &Location,
        format: &str,
        folder: bool,
    ) -> Result<Option<u64>> {
        let ctx = &self.session.ctx;
        let path = if folder {
            format!("{}/", staging.sql())
        } else {
            staging.sql()
        };
        let frame = match format {
            "parquet" => {
                ctx.read_parquet(path, ParquetReadOptions::default())
                    .await?
            }
            "csv" => ctx.read_csv(path, CsvReadOptions::default()).await?,
            "json" | "ndjson" => ctx.read_json(path, JsonReadOptions::default()).await?,
            _ => return Ok(None),
        };
        if frame.schema().field_with_unqualified_name("id").is_err() {
            return Ok(None);
        }
        let batches = frame
            .aggregate(vec![], vec![count_distinct(col("id"))])?
            .collect()
            .await?;
        Ok(batches
            .first()
            .map(|b| b.column(0).as_primitive::<Int64Type>().value(0) as u64))
    }
}

/// The row count a `COPY` reports (one UInt64 `count`).
fn copied_rows(result: &[RecordBatch]) -> Result<u64> {
    let mut rows = 0;
    for batch in result.iter().filter(|b| b.num_rows() > 0) {
        match batch.column(0).as_primitive_opt::<UInt64Type>() {
            Some(counts) => rows += counts.values().iter().sum::<u64>(),
            None => {
                return Err(EngineError::Invalid(format!(
                    "COPY reported its row count as {}, expected UInt64",
                    batch.column(0).data_type()
                )))
            }
        }
    }
    Ok(rows)
}
