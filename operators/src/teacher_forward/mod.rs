//! Teacher-forward (stage 4 of the recipe): a model's 3 logits for every tokenized row,
//! batched by length under a token budget. This module holds the loaded teacher, its
//! settings and a pass's figures; [`exec`] is the streaming, resumable operator and its SQL
//! table function.

pub mod exec;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::{OperatorError, Result};
use arenaflow_models::checkpoint::{load_classifier, open_adapter, parse_dtype};
use arenaflow_models::device::parse_device;
use arenaflow_models::models::{ModelConfig, PaddedBatch, SequenceClassifier};
use arenaflow_models::weights::TensorSource;

/// What the CLI sets on a pass: padding side, and the forward-pass profiler.
pub use arenaflow_models::{models::PaddingSide, profile};

/// What a teacher pass runs: every knob of the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherSettings {
    /// A model folder, a `.gguf` file or a hub id.
    pub model: String,
    /// A PEFT adapter folder.
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights at load (PEFT's `merge_and_unload`: the merged
    /// weights rounded to `dtype`), so the pass runs at the base model's cost; otherwise
    /// each projection adds its LoRA update as PEFT's unmerged forward does.
    pub merge_adapter: bool,
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Padded tokens per forward pass.
    pub max_batch_tokens: usize,
    /// Rows sorted by length together; 0 sorts all rows at once.
    pub sort_window: usize,
    pub padding: PaddingSide,
    /// Benchmarks only: seeded random weights for the architecture of `model` (a
    /// config.json, or a folder with one) instead of its weights.
    pub random_weights: Option<u64>,
    /// Benchmarks only: run the first batch once, untimed, before the pass.
    pub warmup: bool,
}

impl TeacherSettings {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            adapter: None,
            merge_adapter: false,
            dtype: "bf16".into(),
            device: "cpu".into(),
            max_batch_tokens: 8192,
            sort_window: 0,
            padding: PaddingSide::Right,
            random_weights: None,
            warmup: false,
        }
    }

    /// Checks what can be checked without loading the model.
    pub fn validate(&self) -> Result<DType> {
        if self.max_batch_tokens == 0 {
            return Err(OperatorError::Config(
                "max_batch_tokens must be at least 1".into(),
            ));
        }
        Ok(parse_dtype(&self.dtype)?)
    }
}

/// A loaded teacher on its device.
pub struct Teacher {
    pub model: SequenceClassifier,
    pub settings: TeacherSettings,
    pub device: Device,
}

impl Teacher {
    pub fn load(settings: &TeacherSettings) -> Result<Self> {
        let dtype = settings.validate()?;
        let device = parse_device(&settings.device)?;
        let mut model = match settings.random_weights {
            None => load_classifier(&settings.model, settings.adapter.as_deref(), dtype, &device)?,
            Some(seed) => {
                let path = Path::new(&settings.model);
                let config = if path.is_dir() {
                    path.join("config.json")
                } else {
                    path.to_path_buf()
                };
                let config = ModelConfig::from_file(&config)?;
                let adapter = settings.adapter.as_deref().map(open_adapter).transpose()?;
                SequenceClassifier::load(
                    &config,
                    &TensorSource::Random { seed, std: 0.02 },
                    adapter.as_ref().map(|a| (&a.config, &a.tensors)),
                    dtype,
                    &device,
                )?
            }
        };
        if settings.merge_adapter {
            model.merge_adapters()?;
        }
        Ok(Self {
            model,
            settings: settings.clone(),
            device,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// One padded forward pass over `rows`: their logits, in order.
    pub fn forward(&self, rows: &[&[u32]]) -> Result<Vec<[f32; 3]>> {
        let pad = self.model.pad_token_id().unwrap_or(0);
        let batch = PaddedBatch::pad(rows, pad, self.settings.padding)?;
        let logits = self
            .model
            .forward_t(&batch, false)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        logits
            .into_iter()
            .map(|l| {
                <[f32; 3]>::try_from(l.as_slice()).map_err(|_| {
                    OperatorError::Config(format!(
                        "the score head gives {} logits per row, not 3",
                        l.len()
                    ))
                })
            })
            .collect()
    }

    /// The batches `plan_batches` makes for these rows under this teacher's budget.
    pub fn plan(&self, lengths: &[usize]) -> Vec<Vec<usize>> {
        crate::token_rows::plan_batches(
            lengths,
            self.settings.max_batch_tokens,
            self.model.pad_token_id().is_none(),
        )
    }
}

/// The final figures of one teacher pass, recorded in the run manifest.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ForwardStats {
    pub operator: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// Rows in the output, including those resumed from earlier commits.
    pub rows: u64,
    /// Rows computed by this invocation (the rest were resumed).
    pub computed_rows: u64,
    pub resumed_rows: u64,
    /// Real tokens of the computed rows.
    pub tokens: u64,
    /// Tokens including padding.
    pub padded_tokens: u64,
    pub padding_percent: f64,
    pub batches: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub rows_per_second: f64,
    /// GPU memory in use at its peak (device-wide), or the process's peak resident memory.
    pub peak_memory_bytes: Option<u64>,
    /// Seconds by section of the forward pass, when profiled (`arenaflow_models::profile`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub profile: std::collections::BTreeMap<String, f64>,
}

impl ForwardStats {
    /// The rates and padding share from the counts and `elapsed`.
    pub fn finish(&mut self, elapsed: Duration) {
        self.seconds = elapsed.as_secs_f64();
        let secs = self.seconds.max(1e-9);
        self.tokens_per_second = self.tokens as f64 / secs;
        self.rows_per_second = self.computed_rows as f64 / secs;
        self.padding_percent = if self.padded_tokens == 0 {
            0.0
        } else {
            100.0 * (self.padded_tokens - self.tokens) as f64 / self.padded_tokens as f64
        };
    }

    pub fn summary(&self) -> String {
        format!(
            "{} rows ({} computed, {} resumed), {} tokens, padding {:.1}%, {:.1} s, {:.0} tokens/s, {:.1} rows/s, peak memory {}",
            self.rows,
            self.computed_rows,
            self.resumed_rows,
            self.tokens,
            self.padding_percent,
            self.seconds,
            self.tokens_per_second,
            self.rows_per_second,
            self.peak_memory_bytes
                .map_or("-".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
        )
    }
}

/// Progress of a pass: a bar (rows, tokens/s, ETA) on a terminal, a log line every
/// `ARENAFLOW_LOG_EVERY` seconds (default 30) otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Instant,
    log_every: Duration,
    total: u64,
    done: u64,
    tokens: u64,
    label: String,
    unit: String,
    /// Shown before the rate (training: the last step's loss).
    note: String,
}

impl Progress {
    pub fn new(label: &str, total: u64, already: u64) -> Self {
        Self::with_unit(label, "rows", total, already)
    }

    /// A progress bar counting `unit` (rows, steps).
    pub fn with_unit(label: &str, unit: &str, total: u64, already: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{msg}}, ETA {{eta}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(already);
            bar
        });
        let log_every = std::env::var("ARENAFLOW_LOG_EVERY")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(30.0);
        Self {
            bar,
            started: Instant::now(),
            last_log: Instant::now(),
            log_every: Duration::from_secs_f64(log_every.max(0.0)),
            total,
            done: already,
            tokens: 0,
            label: label.to_string(),
            unit: unit.to_string(),
            note: String::new(),
        }
    }

    /// Text shown before the rate from the next update on (e.g. `loss 1.0921`).
    pub fn set_note(&mut self, note: String) {
        self.note = if note.is_empty() { note } else { note + ", " };
    }

    pub fn advance(&mut self, rows: u64, tokens: u64) {
        self.done += rows;
        self.tokens += tokens;
        let rate = self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{}{rate:.0} tokens/s", self.note));
            bar.set_position(self.done);
        } else if self.last_log.elapsed() >= self.log_every || self.done == self.total {
            self.last_log = Instant::now();
            let elapsed = self.started.elapsed().as_secs_f64();
            let left = self.total.saturating_sub(self.done);
            let per_row = elapsed / (self.done as f64).max(1.0);
            eprintln!(
                "{}: {}/{} {}, {}{rate:.0} tokens/s, ETA {:.0} s",
                self.label,
                self.done,
                self.total,
                self.unit,
                self.note,
                per_row * left as f64
            );
        }
    }

    /// Rows known so far (the total grows window by window).
    pub fn set_total(&mut self, total: u64) {
        self.total = total.max(self.done);
        if let Some(bar) = &self.bar {
            bar.set_length(self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
