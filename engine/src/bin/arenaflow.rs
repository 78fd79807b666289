//! `arenaflow`: run and describe plan files.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use arenaflow_engine::logits::{run_logits, LogitsOptions};
use arenaflow_engine::plan::{RUN_DIR_PARAM, SHARD_COUNT_PARAM, SHARD_INDEX_PARAM};
use arenaflow_engine::quantize::{run_quantize, QuantizeOptions};
use arenaflow_engine::recipe::{fold_text, Recipe};
use arenaflow_engine::runner::Shard;
use arenaflow_engine::train::{run_train, TrainOptions};
use arenaflow_engine::{run_plan, ArenaSession, PlanFile, RunOptions};
use arenaflow_models::gptq::GptqConfig;
use arenaflow_operators::distill_step::TrainSettings;
use arenaflow_operators::teacher_forward::{PaddingSide, TeacherSettings};
use clap::{Arg, ArgAction, ArgMatches, Parser, Subcommand};
use datafusion::sql::parser::{DFParser, Statement};

#[derive(Parser)]
#[command(
    name = "arenaflow",
    version,
    about = "Pairwise-preference distillation pipelines as DataFusion plans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run plan files in order, in one run directory; or a recipe (RECIPE.toml: the
    /// stages of the whole pipeline with one set of parameters).
    Run {
        /// Plan files (SQL with `-- param` declarations), or one recipe file (.toml).
        #[arg(required = true)]
        plans: Vec<String>,
        /// Set a declared parameter (repeatable): --set fold=2
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
        sets: Vec<(String, String)>,
        /// Run directory: outputs and manifest.json live here (local path or s3://bucket/prefix).
        #[arg(long, default_value = "runs/default")]
        run_dir: String,
        /// Overwrite outputs recorded for another stage or other parameters.
        #[arg(long)]
        force: bool,
        /// Run shard i of n (0-based) of a plan that splits its rows by ${shard_index};
        /// defaults from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when set, else 0/1.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Of a recipe, run only these stages (numbers as `describe` lists them): 1-3,7
        #[arg(long, value_name = "LIST")]
        stages: Option<String>,
        /// Of a recipe, run its per-fold stages for these folds only (0-based): 0-2,4; e.g.
        /// one fold per call on a machine lent for minutes (runs of one run directory take
        /// turns: its lock).
        #[arg(long, value_name = "LIST")]
        folds: Option<String>,
        /// One worker per device over a plan that splits its rows by ${shard_index}
        /// (cuda:0,cuda:1: shard i of n on the i-th, side by side); merge with
        /// plans/teacher_merge.sql --set shards=n.
        #[arg(long, value_name = "LIST", conflicts_with = "shard")]
        devices: Option<String>,
    },
    /// List a plan's parameters (with defaults) and its outputs; or a recipe's parameters
    /// and every stage's knobs with the values they get.
    Describe { plan: String },
    /// A model's 3 logits for rows of token ids: reads `id`, `input_ids` (list<int32>,
    /// unpadded) from Parquet and writes `id`, `logits` (3 x f32).
    Logits {
        /// Model folder (config.json + safetensors), .gguf file, or hub id org/name.
        #[arg(long)]
        model: String,
        /// PEFT LoRA adapter folder on top of the model.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        /// Fold the adapter into the weights at load (PEFT's merge_and_unload): the base
        /// model's speed, the merged weights rounded to --dtype.
        #[arg(long)]
        merge_adapter: bool,
        /// Weights and activations: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// cpu, cuda or cuda:N (a missing device is an error, never a fallback).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Benchmarks: seeded random weights (std 0.02) for the architecture in --model
        /// (a config.json or a folder with one) instead of its weights.
        #[arg(long, value_name = "SEED")]
        random_weights: Option<u64>,
        /// Benchmarks: run the first batch once before the timed pass.
        #[arg(long)]
        warmup: bool,
        /// Benchmarks: seconds by section of the forward pass (projections, attention,
        /// norms...), synchronising the device around each, in the printed figures.
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        input: std::path::PathBuf,
        #[arg(long)]
        output: std::path::PathBuf,
        /// Padded tokens per forward pass.
        #[arg(long, default_value_t = 8192)]
        max_batch_tokens: usize,
        /// Pad rows on the right or the left.
        #[arg(long, default_value = "right", value_parser = ["right", "left"])]
        padding: String,
    },
    /// Train a LoRA adapter and the score head of a 3-class classifier on rows of token
    /// ids (Parquet: `id`, `input_ids`, `label`; optional `order`, `weight`, `split`
    /// ('train'/'dev') and teacher logit columns): the `distill_step` operator, as the
    /// plans run it. Writes a PEFT folder with `metrics.parquet`; after kill -9 the same
    /// command continues from its last checkpoint. Under torchrun or srun (WORLD_SIZE,
    /// RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or SLURM's task variables) each process
    /// is a data-parallel rank: it trains on its share of every step's rows, the ranks sum
    /// their gradients, and rank 0 writes the output.
    Train(TrainArgs),
    /// GPTQ (8 bits, groups of 128 by default) of a model, its adapter merged first: the
    /// first --rows rows of a Parquet file of token ids (`input_ids`, list<int32>: training
    /// rows through the plans' template and truncation) calibrate every projection of the
    /// decoder, layer by layer; writes a GPTQ checkpoint folder (qweight, qzeros, scales,
    /// g_idx, quantization_config) whole or not at all. The score head stays in float.
    Quantize {
        /// Model folder (config.json + safetensors), .gguf file, or hub id org/name.
        #[arg(long)]
        model: String,
        /// PEFT LoRA adapter folder, merged into the weights before quantizing.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        #[arg(long)]
        input: std::path::PathBuf,
        /// Calibration rows (the file's first).
        #[arg(long, default_value_t = 128)]
        rows: usize,
        #[arg(long)]
        output: std::path::PathBuf,
        /// 8, 4 or 2.
        #[arg(long, default_value_t = 8)]
        bits: u32,
        /// Input columns per scale and zero; -1: one group per row.
        #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
        group_size: i64,
        /// Damping of H's diagonal as a fraction of its mean (the reference's 0.01;
        /// transformers' GPTQConfig uses 0.1).
        #[arg(long, default_value_t = 0.01)]
        damp_percent: f64,
        /// Quantize columns in order of decreasing Hessian diagonal (desc_act).
        #[arg(long)]
        act_order: bool,
        /// The model's dtype while calibrating: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Merge a PEFT adapter into its base: a Hugging Face `*ForSequenceClassification`
    /// folder (config.json, model.safetensors) that transformers loads with the same logits
    /// as base + adapter, written whole or not at all.
    Merge {
        /// The base model: folder (config.json + safetensors), .gguf file, or hub id.
        #[arg(long)]
        model: String,
        /// The PEFT adapter folder (with the score head).
        #[arg(long)]
        adapter: std::path::PathBuf,
        /// The merged folder to write (must not exist).
        #[arg(long)]
        output: std::path::PathBuf,
        /// The merged weights' dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Average the LoRA adapters of several folds: mode `mean` writes one PEFT adapter, the
    /// weighted mean of every lora_A, lora_B and score-head tensor (the 1st place's); mode
    /// `delta` writes a merged model folder, base + the weighted mean of the folds' updates
    /// scale·B·A (exact, which a mean of A and B is not). The adapters must have identical
    /// configs and tensors; the output is written whole or not at all.
    Average {
        /// mean or delta.
        #[arg(long, default_value = "mean")]
        mode: String,
        /// delta: the base model (folder, .gguf or hub id) the adapters were trained on.
        #[arg(long)]
        model: Option<String>,
        /// delta: the merged model's dtype (f32, bf16, f16).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// A fold's PEFT adapter folder (repeat, one per fold, at least 2).
        #[arg(long = "adapter", required = true, num_args = 1)]
        adapters: Vec<std::path::PathBuf>,
        /// The averaged adapter folder to write (must not exist).
        #[arg(long)]
        output: std::path::PathBuf,
        /// Fold weights: uniform, or group_relative (w ∝ exp((mean NLL - NLL_f) / tau)).
        #[arg(long, default_value = "uniform")]
        weights: String,
        /// group_relative: each fold's held-out log loss, in the order of --adapter.
        #[arg(long = "log-loss", value_delimiter = ',')]
        log_losses: Vec<f64>,
        /// group_relative: the temperature tau of the weights.
        #[arg(long, default_value_t = 0.05)]
        tau: f64,
    },
}

/// `arenaflow train`'s arguments: the model, the rows, the output, and every knob of
/// [`TrainSettings::KNOBS`] as `--knob-name VALUE` (switches also as `--knob`/`--no-knob`).
struct TrainArgs {
    model: String,
    input: std::path::PathBuf,
    output: std::path::PathBuf,
    knobs: Vec<(String, String)>,
}

fn flag_name(knob: &str) -> String {
    knob.replace('_', "-")
}

impl clap::Args for TrainArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let defaults = TrainSettings::new("");
        let mut cmd = cmd
            .arg(
                Arg::new("model").long("model").required(true).help(
                    "Model folder (config.json + safetensors), .gguf file, or hub id org/name",
                ),
            )
            .arg(
                Arg::new("input")
                    .long("input")
                    .required(true)
                    .value_parser(clap::value_parser!(std::path::PathBuf))
                    .help("Rows to train on (Parquet)"),
            )
            .arg(
                Arg::new("teacher")
                    .long("teacher")
                    .action(ArgAction::Append)
                    .value_name("COLUMN")
                    .help("A column of teacher logits (repeatable; same as --teachers A,B)"),
            );
        for (knob, help) in TrainSettings::KNOBS {
            let default = defaults.current(knob);
            let help = if default.is_empty() {
                help.to_string()
            } else {
                format!("{help} [default: {default}]")
            };
            let mut arg = Arg::new(*knob).long(flag_name(knob)).help(help);
            if *knob == "output" {
                arg = arg
                    .required(true)
                    .value_parser(clap::value_parser!(std::path::PathBuf));
            }
            if TrainSettings::SWITCHES.contains(knob) {
                arg = arg
                    .num_args(0..=1)
                    .default_missing_value("true")
                    .value_name("BOOL");
                cmd = cmd.arg(
                    Arg::new(format!("no_{knob}"))
                        .long(format!("no-{}", flag_name(knob)))
                        .action(ArgAction::SetTrue)
                        .help(format!("--{} false", flag_name(knob))),
                );
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for TrainArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut knobs = Vec::new();
        for (knob, _) in TrainSettings::KNOBS {
            if *knob == "output" {
                continue;
            }
            if let Some(value) = m.get_one::<String>(knob) {
                knobs.push((knob.to_string(), value.clone()));
            }
            if TrainSettings::SWITCHES.contains(knob) && m.get_flag(&format!("no_{knob}")) {
                knobs.push((knob.to_string(), "false".into()));
            }
        }
        if let Some(teachers) = m.get_many::<String>("teacher") {
            let teachers: Vec<String> = teachers.cloned().collect();
            knobs.push(("teachers".into(), teachers.join(",")));
        }
        Ok(Self {
            model: m.get_one::<String>("model").cloned().unwrap_or_default(),
            input: m
                .get_one::<std::path::PathBuf>("input")
                .cloned()
                .unwrap_or_default(),
            output: m
                .get_one::<std::path::PathBuf>("output")
                .cloned()
                .unwrap_or_default(),
            knobs,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let mut settings = TrainSettings::new(args.model);
    for (knob, value) in &args.knobs {
        settings
            .set(knob, value)
            .map_err(|e| anyhow::anyhow!("--{}: {e}", flag_name(knob)))?;
    }
    settings.validate()?;
    let options = TrainOptions {
        settings,
        input: args.input,
        output: args.output,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let batches = rt.block_on(run_train(&options))?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    println!(
        "{}",
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
    );
    match arenaflow_operators::distill_step::exec::data_parallel_rank()? {
        Some(rv) if rv.rank > 0 => println!(
            "rank {} of {}: done; rank 0 writes {}",
            rv.rank,
            rv.world,
            options.output.display()
        ),
        _ => println!(
            "wrote {} (adapter_config.json, adapter_model.safetensors, metrics.parquet: {rows} rows)",
            options.output.display()
        ),
    }
    Ok(())
}

fn merge(
    model: &str,
    adapter: &std::path::Path,
    output: &std::path::Path,
    dtype: &str,
) -> anyhow::Result<()> {
    use arenaflow_models::checkpoint::{load_classifier, parse_dtype, save_merged};
    let classifier = load_classifier(
        model,
        Some(adapter),
        parse_dtype(dtype)?,
        &candle_core::Device::Cpu,
    )?;
    save_merged(&classifier, output)?;
    println!(
        "wrote {} (merged {} into {model}, {dtype})",
        output.display(),
        adapter.display()
    );
    Ok(())
}

fn average(
    (mode, model, dtype): (&str, Option<&str>, &str),
    adapters: &[std::path::PathBuf],
    output: &std::path::Path,
    weights: &str,
    log_losses: Vec<f64>,
    tau: f64,
) -> anyhow::Result<()> {
    use arenaflow_models::average::{average_adapters, FoldWeights};
    let weights = match weights {
        "uniform" if log_losses.is_empty() => FoldWeights::Uniform,
        "uniform" => bail!("--log-loss is for --weights group_relative"),
        "group_relative" => FoldWeights::GroupRelative { log_losses, tau },
        other => bail!("--weights {other}: expected uniform or group_relative"),
    };
    let used = match (mode, model) {
        ("mean", None) => average_adapters(adapters, &weights, output)?,
        ("mean", Some(_)) => bail!("--model is for --mode delta"),
        ("delta", Some(model)) => {
            let dtype = arenaflow_models::checkpoint::parse_dtype(dtype)?;
            arenaflow_models::average::average_merged(model, adapters, &weights, dtype, output)?
        }
        ("delta", None) => {
            bail!("--mode delta needs --model (the base the adapters were trained on)")
        }
        (other, _) => bail!("--mode {other}: expected mean or delta"),
    };
    for (adapter, w) in adapters.iter().zip(&used) {
        println!("{:.6}  {}", w, adapter.display());
    }
    let what = if mode == "mean" {
        "mean adapter"
    } else {
        "merged model, mean of the updates"
    };
    println!(
        "wrote {} ({what} of {} adapters)",
        output.display(),
        adapters.len()
    );
    Ok(())
}

fn parse_set(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected NAME=VALUE, got {arg:?}")),
    }
}

/// `--shard`, else the SLURM array task, else the whole input.
fn shard_of_run(flag: Option<&str>) -> anyhow::Result<Shard> {
    Ok(match flag {
        Some(text) => Shard::parse(text)?,
        None => Shard::from_env(|name| std::env::var(name).ok())?.unwrap_or_default(),
    })
}

async fn run(
    plans: Vec<String>,
    sets: Vec<(String, String)>,
    run_dir: String,
    force: bool,
    shard: Shard,
    selection: Selection,
) -> anyhow::Result<()> {
    if plans.iter().any(|p| Recipe::is_recipe(p)) {
        if plans.len() > 1 {
            bail!("a recipe runs alone: arenaflow run RECIPE.toml [--set ...]");
        }
        return run_recipe(&plans[0], &sets, run_dir, force, shard, &selection).await;
    }
    if let Some(stages) = selection.stages {
        bail!("--stages {stages} selects stages of a recipe; plan files run as listed");
    }
    if let Some(folds) = selection.folds {
        bail!("--folds {folds} selects folds of a recipe's per-fold stages; a plan takes --set fold=N");
    }
    let plans = plans
        .iter()
        .map(|p| PlanFile::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    for (name, _) in &sets {
        if name == RUN_DIR_PARAM {
            bail!("--set run_dir: use --run-dir");
        }
        if !plans.iter().any(|p| p.declares(name)) {
            let files: Vec<&str> = plans.iter().map(|p| p.file.as_str()).collect();
            bail!(
                "--set {name}: no plan declares such a parameter ({})",
                files.join(", ")
            );
        }
    }
    let mut stdout = std::io::stdout().lock();
    for plan in &plans {
        let own_sets: Vec<(String, String)> = sets
            .iter()
            .filter(|(n, _)| plan.declares(n))
            .cloned()
            .collect();
        let options = RunOptions {
            run_dir: run_dir.clone(),
            sets: own_sets,
            force,
            shard,
        };
        writeln!(stdout, "== {} (stage {})", plan.file, plan.stage)?;
        // Each plan gets its own session: its tables and views are its own.
        let session = ArenaSession::new();
        let summary = run_plan(&session, plan, &options, &mut stdout).await?;
        if summary.written.is_empty() && !summary.up_to_date.is_empty() {
            writeln!(
                stdout,
                "{}: all {} outputs up to date, nothing written",
                plan.file,
                summary.up_to_date.len()
            )?;
        }
    }
    Ok(())
}

/// `run PLAN --devices LIST`: one worker process per device, each a shard of the plan.
fn run_on_devices(
    plans: &[String],
    sets: &[(String, String)],
    run_dir: &str,
    force: bool,
    devices: &str,
    selection: Option<String>,
) -> anyhow::Result<()> {
    let [plan] = plans else {
        bail!("--devices runs one plan file on several devices");
    };
    if Recipe::is_recipe(plan) {
        bail!("--devices runs one plan file (a sharded stage such as plans/teacher_logits.sql), not a recipe");
    }
    if let Some(selection) = selection {
        bail!("--devices runs a plan file: --stages and --folds ({selection}) select parts of a recipe");
    }
    let devices = arenaflow_engine::workers::parse_devices(devices)?;
    let exe = std::env::current_exe().context("cannot find this program to start its workers")?;
    arenaflow_engine::workers::run_workers(&exe, plan, sets, run_dir, force, &devices)?;
    println!(
        "{plan}: {} workers done (shards 0..{} of {}); merge them with plans/teacher_merge.sql --set shards={}",
        devices.len(),
        devices.len() - 1,
        devices.len(),
        devices.len()
    );
    Ok(())
}

/// What of a recipe `run` runs: `--stages` and `--folds`, all when unset.
struct Selection {
    stages: Option<String>,
    folds: Option<String>,
}

/// Runs every stage of a recipe in order (each plan run in its own session, as `run` does).
async fn run_recipe(
    path: &str,
    sets: &[(String, String)],
    run_dir: String,
    force: bool,
    shard: Shard,
    selection: &Selection,
) -> anyhow::Result<()> {
    if shard.count > 1 {
        bail!(
            "a recipe runs whole, not as shard {}/{} (--shard, or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT): run the plan of its sharded stage as the array job",
            shard.index,
            shard.count
        );
    }
    let recipe = Recipe::load(path)?;
    let mut runs = recipe.runs(sets)?;
    if let Some(stages) = &selection.stages {
        let selected = recipe.select_stages(stages)?;
        runs.retain(|run| selected.contains(&(run.stage + 1)));
    }
    if let Some(folds) = &selection.folds {
        let selected = recipe.select_folds(folds, &recipe.runs(sets)?)?;
        runs.retain(|run| run.fold.is_none_or(|fold| selected.contains(&fold)));
    }
    let mut stdout = std::io::stdout().lock();
    if let Some(description) = &recipe.description {
        writeln!(stdout, "{}", description.trim_end())?;
    }
    let started = std::time::Instant::now();
    let (mut written, mut up_to_date) = (0, 0);
    for (i, stage_run) in runs.iter().enumerate() {
        let stage = &recipe.stages[stage_run.stage];
        writeln!(
            stdout,
            "== [{}/{}] {}{} (stage {})",
            i + 1,
            runs.len(),
            stage.plan.file,
            fold_text(stage_run.fold),
            stage.plan.stage
        )?;
        let options = RunOptions {
            run_dir: run_dir.clone(),
            sets: stage_run.sets.clone(),
            force,
            shard,
        };
        let session = ArenaSession::new();
        let began = std::time::Instant::now();
        let summary = run_plan(&session, &stage.plan, &options, &mut stdout).await?;
        written += summary.written.len();
        up_to_date += summary.up_to_date.len();
        writeln!(
            stdout,
            "   {} written, {} up to date, {:.1} s",
            summary.written.len(),
            summary.up_to_date.len(),
            began.elapsed().as_secs_f64()
        )?;
    }
    writeln!(
        stdout,
        "recipe {}: {} plan runs, {written} outputs written, {up_to_date} up to date, {:.1} s",
        recipe.file,
        runs.len(),
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// A recipe's parameters and, per stage, every knob of its plan with the value it gets
/// and where the value comes from.
fn describe_recipe(path: &str) -> anyhow::Result<()> {
    let recipe = Recipe::load(path)?;
    // Every stage's values checked against its plan, as `run` does before the first stage.
    let runs = recipe.runs(&[])?;
    println!("recipe {} ({} plan runs)", recipe.file, runs.len());
    if let Some(description) = &recipe.description {
        println!("{}", description.trim_end());
    }
    println!(
        "parameters (--set NAME=VALUE; a plan parameter no stage sets itself can be --set too):"
    );
    for (name, value) in &recipe.params {
        let doc = recipe
            .stages
            .iter()
            .flat_map(|s| s.plan.params.iter())
            .find(|p| &p.name == name)
            .and_then(|p| p.doc.clone())
            .unwrap_or_default();
        println!("  {name:<24} {:<40} {doc}", format!("{value:?}"));
    }
    println!("stages:");
    for (i, stage) in recipe.stages.iter().enumerate() {
        println!(
            "  {}. {} (stage {}){}",
            i + 1,
            stage.plan.file,
            stage.plan.stage,
            if stage.per_fold {
                ", once per fold 0..k-1"
            } else {
                ""
            }
        );
        for p in &stage.plan.params {
            let (value, from) = if let Some(v) = stage.sets.get(&p.name) {
                (format!("{v:?}"), "stage")
            } else if stage.per_fold && p.name == "fold" {
                ("0..k-1".to_string(), "per fold")
            } else if let Some(v) = recipe.params.get(&p.name) {
                (format!("{v:?}"), "recipe")
            } else if let Some(d) = &p.default {
                (format!("{d:?}"), "default")
            } else {
                ("(required)".to_string(), "unset")
            };
            println!(
                "       {:<22} {:<40} {:<8} {}",
                p.name,
                value,
                from,
                p.doc.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn describe(path: &str) -> anyhow::Result<()> {
    if Recipe::is_recipe(path) {
        return describe_recipe(path);
    }
    let plan = PlanFile::load(path)?;
    println!("plan {} (stage {})", plan.file, plan.stage);
    println!("parameters:");
    println!(
        "  {:<16} {:<40} built in: --run-dir",
        RUN_DIR_PARAM, "runs/default"
    );
    println!(
        "  {:<16} {:<40} built in: --shard I/N or the SLURM array task",
        format!("{SHARD_INDEX_PARAM}, {SHARD_COUNT_PARAM}"),
        "0, 1"
    );
    let mut values = std::collections::BTreeMap::new();
    values.insert(RUN_DIR_PARAM.to_string(), "${run_dir}".to_string());
    values.insert(SHARD_INDEX_PARAM.to_string(), "${shard_index}".to_string());
    values.insert(SHARD_COUNT_PARAM.to_string(), "${shard_count}".to_string());
    for p in &plan.params {
        let default = p.default.as_deref().map_or("(required)".to_string(), |d| {
            if d.is_empty() {
                "''".into()
            } else {
                d.to_string()
            }
        });
        let name = match p.kind {
            arenaflow_engine::plan::ParamType::Text => p.name.clone(),
            kind => format!("{}: {}", p.name, kind.name()),
        };
        println!(
            "  {:<16} {:<40} {}",
            name,
            default,
            p.doc.as_deref().unwrap_or("")
        );
        values.insert(
            p.name.clone(),
            p.default.clone().unwrap_or_else(|| format!("<{}>", p.name)),
        );
    }
    println!("outputs:");
    for statement in &plan.statements {
        let sql = plan.substitute(statement, &values)?;
        if let Ok(mut parsed) = DFParser::parse_sql(&sql) {
            if let Some(Statement::CopyTo(copy)) = parsed.pop_front() {
                let partitions = if copy.partitioned_by.is_empty() {
                    String::new()
                } else {
                    format!(" partitioned by {}", copy.partitioned_by.join(", "))
                };
                println!(
                    "  line {:<4} {} ({}){partitions}",
                    statement.line,
                    copy.target,
                    copy.stored_as.as_deref().unwrap_or("by extension")
                );
            }
        }
    }
    Ok(())
}

/// `--group-size`: -1 for one group per row, else a positive width.
fn group_of(group_size: i64) -> anyhow::Result<Option<usize>> {
    match group_size {
        -1 => Ok(None),
        g if g > 0 => Ok(Some(g as usize)),
        g => anyhow::bail!("--group-size {g}: a positive width, or -1 for one group per row"),
    }
}

fn quantize(options: QuantizeOptions) -> anyhow::Result<()> {
    let stats = run_quantize(&options)?;
    println!(
        "wrote {}: {} projections, {} calibration rows ({} tokens), {:.1} s",
        options.output.display(),
        stats.projections,
        stats.rows,
        stats.tokens,
        stats.seconds
    );
    Ok(())
}

fn logits(options: LogitsOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let stats = rt.block_on(run_logits(&options))?;
    println!("wrote {}: {}", options.output.display(), stats.summary());
    println!("stats {}", serde_json::to_string(&stats)?);
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARENAFLOW_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            plans,
            sets,
            run_dir,
            force,
            shard: _,
            stages,
            folds,
            devices: Some(devices),
        } => run_on_devices(&plans, &sets, &run_dir, force, &devices, stages.or(folds)),
        Command::Run {
            plans,
            sets,
            run_dir,
            force,
            shard,
            stages,
            folds,
            devices: None,
        } => shard_of_run(shard.as_deref()).and_then(|shard| {
            let selection = Selection { stages, folds };
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(run(plans, sets, run_dir, force, shard, selection)))
        }),
        Command::Describe { plan } => describe(&plan),
        Command::Logits {
            model,
            adapter,
            merge_adapter,
            dtype,
            device,
            random_weights,
            warmup,
            profile,
            input,
            output,
            max_batch_tokens,
            padding,
        } => logits(LogitsOptions {
            teacher: TeacherSettings {
                adapter,
                merge_adapter,
                dtype,
                device,
                max_batch_tokens,
                random_weights,
                warmup,
                padding: if padding == "left" {
                    PaddingSide::Left
                } else {
                    PaddingSide::Right
                },
                ..TeacherSettings::new(model)
            },
            input,
            output,
            profile,
        }),
        Command::Train(args) => train(args),
        Command::Quantize {
            model,
            adapter,
            input,
            rows,
            output,
            bits,
            group_size,
            damp_percent,
            act_order,
            dtype,
            device,
        } => group_of(group_size).and_then(|group_size| {
            quantize(QuantizeOptions {
                model,
                adapter,
                input,
                rows,
                output,
                dtype,
                device,
                gptq: GptqConfig {
                    bits,
                    group_size,
                    damp_percent,
                    act_order,
                    ..GptqConfig::default()
                },
            })
        }),
        Command::Merge {
            model,
            adapter,
            output,
            dtype,
        } => merge(&model, &adapter, &output, &dtype),
        Command::Average {
            mode,
            model,
            dtype,
            adapters,
            output,
            weights,
            log_losses,
            tau,
        } => average(
            (&mode, model.as_deref(), &dtype),
            &adapters,
            &output,
            &weights,
            log_losses,
            tau,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Messages carry their causes (DataFusion's too); `{:#}` would repeat them.
            eprintln!(
                "error: {}",
                arenaflow_engine::storage::explain(&e.to_string())
            );
            ExitCode::FAILURE
        }
    }
}
