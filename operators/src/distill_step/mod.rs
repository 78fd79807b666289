//! Training (stages 1, 3 and 5 of the recipe: post-pretrain, teacher fine-tuning,
//! distillation): LoRA adapters and the score head of a classifier trained on tokenized
//! rows with the recipe's loss. This module holds the settings (every knob, by the name the
//! CLI flag and the plan parameter share), the model set-up and what a run writes; [`exec`]
//! is the operator and its SQL table function.

pub mod exec;
pub mod plot;
pub mod teachers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;

use crate::error::{OperatorError, Result};
use arenaflow_models::checkpoint::{
    open_adapter, open_model, parse_dtype, save_adapter, Checkpoint,
};
use arenaflow_models::device::parse_device;
use arenaflow_models::lora::{LayerSelection, LoraConfig, TargetModules};
use arenaflow_models::models::ModelConfig;
use arenaflow_models::models::{HeadInit, PaddingSide, SequenceClassifier};
use arenaflow_models::train::{
    InfoGainConfig, InfoGainMode, Keep, Schedule, TrainConfig, TrainRow, Trainer,
};
use arenaflow_models::weights::TensorSource;

/// Every knob of a training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSettings {
    /// A model folder, a `.gguf` file or a hub id.
    pub model: String,
    /// Start from this PEFT adapter (its LoRA shape wins over the `lora_*` knobs).
    pub init_adapter: Option<PathBuf>,
    /// Keep the initial adapter's score head (`false`: a fresh head, as the student does).
    pub init_head: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// The adapter's matmuls in the model's dtype, as `torch.autocast` (transformers'
    /// Trainer with `bf16=True`), instead of PEFT's f32.
    pub lora_autocast: bool,
    /// Module names (comma-separated), `all-linear`, or a regular expression.
    pub target_modules: String,
    pub layers_to_transform: Option<Vec<usize>>,
    pub use_rslora: bool,
    /// Columns of teacher logits (3 x f32 each), in order.
    pub teachers: Vec<String>,
    pub dtype: String,
    pub device: String,
    /// Commit a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Write the adapter here (the CLI); inside a managed COPY it goes beside the metrics.
    pub output: Option<PathBuf>,
    /// Where checkpoints go outside a managed COPY (the CLI); inside one, the resume folder.
    pub checkpoint_dir: Option<PathBuf>,
    /// Benchmarks only: seeded random weights (std 0.02) for the architecture of `model`
    /// (a config.json, or a folder with one) instead of its weights.
    pub random_weights: Option<u64>,
    pub train: TrainConfig,
}

impl TrainSettings {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            init_adapter: None,
            init_head: true,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_autocast: false,
            target_modules: "all-linear".into(),
            layers_to_transform: None,
            use_rslora: false,
            teachers: Vec::new(),
            dtype: "bf16".into(),
            device: "cpu".into(),
            checkpoint_every: 50,
            output: None,
            checkpoint_dir: None,
            random_weights: None,
            train: TrainConfig::default(),
        }
    }

    /// The knobs by name, with their meaning: `key=value` settings, CLI flags
    /// (`--lora-r`) and plan parameters share these names.
    pub const KNOBS: &'static [(&'static str, &'static str)] = &[
        ("init_adapter", "PEFT adapter folder to start from"),
        (
            "init_head",
            "keep the initial adapter's score head (true/false)",
        ),
        ("lora_r", "LoRA rank r"),
        ("lora_alpha", "LoRA alpha (scaling alpha / r)"),
        ("lora_dropout", "dropout on the LoRA input"),
        (
            "lora_autocast",
            "the LoRA matmuls in the model's dtype as torch.autocast (true) or in f32 as PEFT (false)",
        ),
        (
            "target_modules",
            "all-linear, names (q_proj,v_proj) or a regex",
        ),
        (
            "layers_to_transform",
            "layer indices (0,1,5), or empty for all",
        ),
        ("use_rslora", "scale by alpha / sqrt(r)"),
        ("teachers", "columns of teacher logits, comma-separated"),
        ("ce_weight", "weight of the cross-entropy term"),
        ("kl_weight", "weight of each teacher's KL term"),
        ("cos_weight", "weight of each teacher's 1 - cosine term"),
        ("temperature", "distillation temperature T"),
        ("lr", "peak learning rate"),
        (
            "schedule",
            "cosine, linear or constant (after linear warm-up)",
        ),
        ("warmup_steps", "warm-up steps (overrides warmup_ratio)"),
        ("warmup_ratio", "warm-up share of the steps, rounded up"),
        ("epochs", "passes over the training rows"),
        (
            "max_steps",
            "stop after this many optimizer steps (0: by epochs)",
        ),
        (
            "batch_rows",
            "rows per optimizer step (both orders of an id together)",
        ),
        ("max_batch_tokens", "padded tokens per micro-batch"),
        ("adam_beta1", "AdamW beta1"),
        ("adam_beta2", "AdamW beta2"),
        ("adam_eps", "AdamW epsilon"),
        ("weight_decay", "AdamW decoupled weight decay"),
        ("max_grad_norm", "clip the global gradient norm (0: off)"),
        (
            "shuffle",
            "shuffle rows each epoch (true) or keep input order",
        ),
        (
            "seed",
            "seed of the data order, dropout, LoRA A and a fresh head",
        ),
        (
            "eval_every",
            "evaluate the dev split every N steps (0: at the end)",
        ),
        ("keep", "last or best (by dev log loss)"),
        (
            "gradient_checkpointing",
            "recompute each layer in the backward pass",
        ),
        ("padding", "right or left"),
        (
            "info_gain",
            "off, prior or ema: information-gain sample weights",
        ),
        ("ig_lambda", "information-gain lambda"),
        ("ig_min", "smallest information-gain weight"),
        ("ig_max", "largest information-gain weight"),
        ("ig_ema_decay", "decay of the ema reference"),
        ("dtype", "base weights: bf16, f16 or f32"),
        ("device", "cpu, cuda or cuda:N"),
        (
            "checkpoint_every",
            "commit a resumable checkpoint every N steps",
        ),
        ("output", "adapter folder to write"),
        (
            "checkpoint_dir",
            "checkpoint folder outside a plan (resume from it)",
        ),
        (
            "random_weights",
            "benchmarks only: seeded random weights (std 0.02) for the model's architecture",
        ),
    ];

    /// The knobs that are switches (`--shuffle`, `--no-shuffle`).
    pub const SWITCHES: &'static [&'static str] = &[
        "init_head",
        "lora_autocast",
        "use_rslora",
        "shuffle",
        "gradient_checkpointing",
    ];

    /// A knob's value as text (the defaults in `--help`).
    pub fn current(&self, key: &str) -> String {
        let t = &self.train;
        let opt = |v: Option<String>| v.unwrap_or_default();
        match key {
            "init_adapter" => opt(self.init_adapter.as_ref().map(|p| p.display().to_string())),
            "init_head" => self.init_head.to_string(),
            "lora_r" => self.lora_r.to_string(),
            "lora_alpha" => self.lora_alpha.to_string(),
            "lora_dropout" => self.lora_dropout.to_string(),
            "lora_autocast" => self.lora_autocast.to_string(),
            "target_modules" => self.target_modules.clone(),
            "layers_to_transform" => opt(self.layers_to_transform.as_ref().map(|l| {
                l.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })),
            "use_rslora" => self.use_rslora.to_string(),
            "teachers" => self.teachers.join(","),
            "ce_weight" => t.loss.ce_weight.to_string(),
            "kl_weight" => t.loss.kl_weight.to_string(),
            "cos_weight" => t.loss.cos_weight.to_string(),
            "temperature" => t.loss.temperature.to_string(),
            "lr" => t.lr.to_string(),
            "schedule" => format!("{:?}", t.schedule).to_lowercase(),
            "warmup_steps" => opt(t.warmup_steps.map(|w| w.to_string())),
            "warmup_ratio" => t.warmup_ratio.to_string(),
            "epochs" => t.epochs.to_string(),
            "max_steps" => t.max_steps.unwrap_or(0).to_string(),
            "batch_rows" => t.batch_rows.to_string(),
            "max_batch_tokens" => t.max_batch_tokens.to_string(),
            "adam_beta1" => t.optimizer.beta1.to_string(),
            "adam_beta2" => t.optimizer.beta2.to_string(),
            "adam_eps" => t.optimizer.eps.to_string(),
            "weight_decay" => t.optimizer.weight_decay.to_string(),
            "max_grad_norm" => t.max_grad_norm.unwrap_or(0.0).to_string(),
            "shuffle" => t.shuffle.to_string(),
            "seed" => t.seed.to_string(),
            "eval_every" => t.eval_every.unwrap_or(0).to_string(),
            "keep" => format!("{:?}", t.keep).to_lowercase(),
            "gradient_checkpointing" => t.gradient_checkpointing.to_string(),
            "padding" => format!("{:?}", t.padding).to_lowercase(),
            "info_gain" => t
                .info_gain
                .map_or("off".into(), |ig| format!("{:?}", ig.mode).to_lowercase()),
            "ig_lambda" => t.info_gain.unwrap_or_default().lambda.to_string(),
            "ig_min" => t.info_gain.unwrap_or_default().w_min.to_string(),
            "ig_max" => t.info_gain.unwrap_or_default().w_max.to_string(),
            "ig_ema_decay" => t.info_gain.unwrap_or_default().ema_decay.to_string(),
            "dtype" => self.dtype.clone(),
            "device" => self.device.clone(),
            "checkpoint_every" => self.checkpoint_every.to_string(),
            "output" => opt(self.output.as_ref().map(|p| p.display().to_string())),
            "checkpoint_dir" => opt(self
                .checkpoint_dir
                .as_ref()
                .map(|p| p.display().to_string())),
            "random_weights" => opt(self.random_weights.map(|seed| seed.to_string())),
            _ => String::new(),
        }
    }

    /// Sets one knob from its text.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |what: &str| OperatorError::Config(format!("{key} = {value:?}: not {what}"));
        let float = || value.trim().parse::<f64>().map_err(|_| bad("a number"));
        let count = || {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| bad("a non-negative integer"))
        };
        let flag = || match value.trim() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(bad("true or false")),
        };
        let list = || -> Vec<String> {
            value
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let t = &mut self.train;
        match key {
            "init_adapter" => self.init_adapter = (!value.is_empty()).then(|| PathBuf::from(value)),
            "init_head" => self.init_head = flag()?,
            "lora_r" => self.lora_r = count()?,
            "lora_alpha" => self.lora_alpha = float()?,
            "lora_dropout" => self.lora_dropout = float()?,
            "lora_autocast" => self.lora_autocast = flag()?,
            "target_modules" => self.target_modules = value.trim().to_string(),
            "layers_to_transform" => {
                let layers = list()
                    .iter()
                    .map(|s| s.parse::<usize>().map_err(|_| bad("layer indices")))
                    .collect::<Result<Vec<_>>>()?;
                self.layers_to_transform = (!layers.is_empty()).then_some(layers);
            }
            "use_rslora" => self.use_rslora = flag()?,
            "teachers" => self.teachers = list(),
            "ce_weight" => t.loss.ce_weight = float()?,
            "kl_weight" => t.loss.kl_weight = float()?,
            "cos_weight" => t.loss.cos_weight = float()?,
            "temperature" => t.loss.temperature = float()?,
            "lr" => t.lr = float()?,
            "schedule" => t.schedule = value.trim().parse::<Schedule>()?,
            "warmup_steps" => t.warmup_steps = Some(count()?),
            "warmup_ratio" => t.warmup_ratio = float()?,
            "epochs" => t.epochs = count()?,
            "max_steps" => t.max_steps = Some(count()?).filter(|&n| n > 0),
            "batch_rows" => t.batch_rows = count()?,
            "max_batch_tokens" => t.max_batch_tokens = count()?,
            "adam_beta1" => t.optimizer.beta1 = float()?,
            "adam_beta2" => t.optimizer.beta2 = float()?,
            "adam_eps" => t.optimizer.eps = float()?,
            "weight_decay" => t.optimizer.weight_decay = float()?,
            "max_grad_norm" => t.max_grad_norm = Some(float()?).filter(|&n| n > 0.0),
            "shuffle" => t.shuffle = flag()?,
            "seed" => t.seed = value.trim().parse::<u64>().map_err(|_| bad("an integer"))?,
            "eval_every" => t.eval_every = Some(count()?).filter(|&n| n > 0),
            "keep" => t.keep = value.trim().parse::<Keep>()?,
            "gradient_checkpointing" => t.gradient_checkpointing = flag()?,
            "padding" => {
                t.padding = match value.trim() {
                    "right" => PaddingSide::Right,
                    "left" => PaddingSide::Left,
                    _ => return Err(bad("right or left")),
                }
            }
            "info_gain" => {
                t.info_gain = match value.trim() {
                    "off" | "" => None,
                    mode => Some(InfoGainConfig {
                        mode: mode.parse::<InfoGainMode>()?,
                        ..t.info_gain.unwrap_or_default()
                    }),
                }
            }
            "ig_lambda" | "ig_min" | "ig_max" | "ig_ema_decay" => {
                let v = float()?;
                let ig = t.info_gain.get_or_insert_with(|| InfoGainConfig {
                    mode: InfoGainMode::Prior,
                    ..Default::default()
                });
                match key {
                    "ig_lambda" => ig.lambda = v,
                    "ig_min" => ig.w_min = v,
                    "ig_max" => ig.w_max = v,
                    _ => ig.ema_decay = v,
                }
            }
            "dtype" => self.dtype = value.trim().to_string(),
            "device" => self.device = value.trim().to_string(),
            "checkpoint_every" => self.checkpoint_every = count()?,
            "output" => self.output = (!value.is_empty()).then(|| PathBuf::from(value)),
            "checkpoint_dir" => {
                self.checkpoint_dir = (!value.is_empty()).then(|| PathBuf::from(value))
            }
            "random_weights" => {
                self.random_weights = match value.trim() {
                    "" => None,
                    v => Some(v.parse::<u64>().map_err(|_| bad("an integer seed"))?),
                }
            }
            other => {
                let known: Vec<&str> = Self::KNOBS.iter().map(|(k, _)| *k).collect();
                return Err(OperatorError::Config(format!(
                    "unknown training setting `{other}`; the settings are: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Applies `key=value` pairs separated by whitespace or newlines (a value holding
    /// spaces goes in double quotes).
    pub fn apply(&mut self, text: &str) -> Result<()> {
        for (key, value) in split_settings(text)? {
            self.set(&key, &value)?;
        }
        Ok(())
    }

    /// Checks what can be checked without loading the model.
    pub fn validate(&self) -> Result<DType> {
        self.train.validate()?;
        self.lora().validate()?;
        if self.train.info_gain.is_some() && self.teachers.is_empty() {
            return Err(OperatorError::Config(
                "info_gain needs teacher logits: name them with teachers=COLUMN[,COLUMN]".into(),
            ));
        }
        Ok(parse_dtype(&self.dtype)?)
    }

    /// The LoRA shape of a fresh adapter.
    pub fn lora(&self) -> LoraConfig {
        let mut lora = LoraConfig::all_linear(self.lora_r, self.lora_alpha, self.lora_dropout);
        let names: Vec<String> = self
            .target_modules
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        lora.target_modules = if self.target_modules == "all-linear" {
            TargetModules::Pattern("all-linear".into())
        } else if names.iter().all(|n| {
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        }) {
            TargetModules::Names(names)
        } else {
            TargetModules::Pattern(self.target_modules.clone())
        };
        lora.layers_to_transform = self.layers_to_transform.clone().map(LayerSelection::Many);
        lora.use_rslora = self.use_rslora;
        lora.base_model_name_or_path = Some(self.model.clone());
        lora
    }

    /// Every setting, as recorded in the manifest.
    pub fn describe(&self) -> BTreeMap<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    }
}

/// `key=value` pairs separated by whitespace; values may be double-quoted.
fn split_settings(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_string();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(OperatorError::Config(format!(
                "training settings: `{key}` is not key=value"
            )));
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            for c in chars.by_ref() {
                if c == '"' {
                    closed = true;
                    break;
                }
                value.push(c);
            }
            if !closed {
                return Err(OperatorError::Config(format!(
                    "training settings: the value of {key} has no closing quote"
                )));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// Loads the model to train: the base, frozen in its dtype; the initial adapter or fresh
/// LoRA weights (A drawn from the seed, B zero, as PEFT does); the score head from the
/// checkpoint or the initial adapter, or fresh.
pub fn load_model(settings: &TrainSettings) -> Result<SequenceClassifier> {
    let dtype = settings.validate()?;
    let device = parse_device(&settings.device)?;
    let checkpoint = match settings.random_weights {
        None => open_model(&settings.model)?,
        Some(seed) => {
            let path = Path::new(&settings.model);
            let config = if path.is_dir() {
                path.join("config.json")
            } else {
                path.to_path_buf()
            };
            Checkpoint {
                config: ModelConfig::from_file(&config)?,
                tensors: TensorSource::Random { seed, std: 0.02 },
                location: settings.model.clone(),
            }
        }
    };
    let adapter = settings
        .init_adapter
        .as_deref()
        .map(open_adapter)
        .transpose()?;
    let has_head = checkpoint
        .tensors
        .names()
        .is_some_and(|n| n.contains("score.weight"))
        || adapter
            .as_ref()
            .is_some_and(|a| a.config.saves_score_head());
    let head = if settings.init_head && has_head {
        HeadInit::Checkpoint
    } else {
        HeadInit::Fresh {
            seed: settings.train.seed ^ 0x5c0e,
        }
    };
    let mut model = SequenceClassifier::load_with_head(
        &checkpoint.config,
        &checkpoint.tensors,
        adapter.as_ref().map(|a| (&a.config, &a.tensors)),
        dtype,
        &device,
        head,
    )?;
    match &adapter {
        Some(a) => {
            model.set_lora_dropout(settings.lora_dropout)?;
            let mut lora = a.config.clone();
            lora.lora_dropout = settings.lora_dropout;
            lora.modules_to_save = Some(vec!["score".into()]);
            model.lora = Some(lora);
        }
        None => model.init_lora(&settings.lora(), settings.train.seed)?,
    }
    model.set_lora_autocast(settings.lora_autocast);
    model.score.trainable = true;
    Ok(model)
}

/// The type of a teacher-logits column: a list of 3 f32 (A, B, tie).
pub fn logits_type() -> datafusion::arrow::datatypes::DataType {
    use datafusion::arrow::datatypes::{DataType, Field};
    DataType::List(std::sync::Arc::new(Field::new_list_field(
        DataType::Float32,
        true,
    )))
}

/// The figures of one training run, recorded in the run manifest.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TrainingStats {
    pub operator: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub train_rows: usize,
    pub dev_rows: usize,
    pub teachers: usize,
    pub steps: usize,
    /// Steps taken by this invocation (the rest came from a checkpoint).
    pub computed_steps: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Shares of the steps' time: forward, backward (with recomputation), optimizer.
    pub forward_share: f64,
    pub backward_share: f64,
    pub optimizer_share: f64,
    /// GPU memory in use at its peak (device-wide), or the process's peak resident memory.
    pub peak_memory_bytes: Option<u64>,
    /// On a GPU, the most memory the run's allocations held at once (torch's
    /// `max_memory_allocated`; see `arenaflow_models::device::peak_allocated`).
    pub peak_allocated_bytes: Option<u64>,
    /// `last` or `best`, and the step whose adapter was written.
    pub keep: String,
    pub kept_step: usize,
    /// Dev log loss of the kept adapter and of the last evaluation, where there is a dev split.
    pub kept_dev_log_loss: Option<f64>,
    pub last_dev_log_loss: Option<f64>,
    pub settings: BTreeMap<String, serde_json::Value>,
}

impl TrainingStats {
    pub fn summary(&self) -> String {
        format!(
            "{} steps ({} computed), {} tokens, {:.1} s, {:.0} tokens/s (forward {:.0}%, backward {:.0}%, optimizer {:.0}%), peak memory {}{}, kept step {} ({}){}",
            self.steps,
            self.computed_steps,
            self.tokens,
            self.seconds,
            self.tokens_per_second,
            100.0 * self.forward_share,
            100.0 * self.backward_share,
            100.0 * self.optimizer_share,
            self.peak_memory_bytes
                .map_or("-".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)),
            self.peak_allocated_bytes.map_or(String::new(), |b| format!(
                " ({:.2} GiB allocated)",
                b as f64 / (1u64 << 30) as f64
            )),
            self.kept_step,
            self.keep,
            self.kept_dev_log_loss
                .map_or(String::new(), |l| format!(", dev log loss {l:.4}"))
        )
    }
}

/// Writes the trained adapter as a PEFT folder (written whole or not at all).
pub fn write_adapter(model: &SequenceClassifier, dir: &Path) -> Result<()> {
    Ok(save_adapter(model, dir)?)
}

/// The rows of a training run, for the trainer.
pub type Rows = Vec<TrainRow>;

/// A trainer over `rows` with `settings` (the model loaded).
pub fn trainer(settings: &TrainSettings, rows: Rows) -> Result<Trainer> {
    let model = load_model(settings)?;
    Ok(Trainer::new(model, settings.train.clone(), rows)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_by_name_and_unknown_ones_are_listed() {
        let mut s = TrainSettings::new("m");
        s.apply("lr=1e-3 lora_r=8 teachers=t1,t2 target_modules=q_proj,v_proj\n schedule=linear keep=best info_gain=ema ig_lambda=0.3 output=\"a b\"")
            .unwrap();
        assert_eq!(s.train.lr, 1e-3);
        assert_eq!(s.lora_r, 8);
        assert_eq!(s.teachers, vec!["t1", "t2"]);
        assert_eq!(s.train.schedule, Schedule::Linear);
        assert_eq!(s.train.keep, Keep::Best);
        let ig = s.train.info_gain.unwrap();
        assert_eq!((ig.mode, ig.lambda), (InfoGainMode::Ema, 0.3));
        assert_eq!(s.output, Some(PathBuf::from("a b")));
        assert!(matches!(s.lora().target_modules, TargetModules::Names(ref n) if n.len() == 2));
        let err = s.apply("learning_rate=1").unwrap_err().to_string();
        assert!(
            err.contains("unknown training setting `learning_rate`") && err.contains("lr"),
            "{err}"
        );
        let err = s.apply("lr=fast").unwrap_err().to_string();
        assert!(err.contains("lr = \"fast\": not a number"), "{err}");
    }
}
