//! Training: LoRA fine-tuning of a [`SequenceClassifier`] (adapters and score head; the
//! base frozen) with the recipe's distillation loss ([`loss`]), torch's AdamW, gradient
//! clipping and transformers' schedules ([`optim`]), information-gain sample weights
//! ([`info_gain`]), per-layer gradient checkpointing, and checkpoints that resume bitwise
//! ([`state`]), and data-parallel ranks that sum their gradients ([`collective`]).
//! [`Trainer`] runs the loop; the operators crate feeds it rows and turns its [`Event`]s
//! into record batches.

pub mod collective;
pub mod info_gain;
pub mod loss;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod state;
mod trainer;

use serde::{Deserialize, Serialize};

pub use collective::{Collective, Rendezvous, Single, TcpCollective};
pub use info_gain::{InfoGain, InfoGainConfig, InfoGainMode};
pub use loss::{LossConfig, LossTerms};
pub use optim::{AdamW, AdamWConfig, Schedule};
pub use trainer::{StepGradients, Trainer};

use crate::error::{ModelError, Result};
use crate::models::PaddingSide;

/// One tokenized training (or dev) row.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRow {
    pub id: String,
    /// `ab` or `ba`: both orders of an id go into the same optimizer step.
    pub order: String,
    pub input_ids: Vec<u32>,
    /// 0 = A wins, 1 = B wins, 2 = tie.
    pub label: u32,
    /// The row's sample weight (1 without a `weight` column).
    pub weight: f64,
    /// Each teacher's 3 logits, in the order the teachers are named.
    pub teachers: Vec<[f32; 3]>,
    /// Evaluated, not trained on.
    pub dev: bool,
}

/// Which adapter the run ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The adapter after the last step.
    Last,
    /// The adapter of the evaluation with the lowest dev log loss (that fold's CV is then
    /// optimistic: the dev rows chose it).
    Best,
}

impl std::str::FromStr for Keep {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(Self::Last),
            "best" => Ok(Self::Best),
            other => Err(ModelError::Config(format!(
                "keep `{other}` is not one of last, best"
            ))),
        }
    }
}

/// Every knob of a training run; recorded in the manifest and in the checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub loss: LossConfig,
    pub optimizer: AdamWConfig,
    pub lr: f64,
    pub schedule: Schedule,
    /// Warm-up steps; when absent, ceil(warmup_ratio · total steps) as transformers does.
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule spans them).
    pub max_steps: Option<usize>,
    /// Rows per optimizer step (both orders of an id count as two rows and stay together).
    pub batch_rows: usize,
    /// Padded tokens per micro-batch: a step is split into micro-batches under it.
    pub max_batch_tokens: usize,
    pub max_grad_norm: Option<f64>,
    pub shuffle: bool,
    pub seed: u64,
    /// Evaluate the dev rows every this many steps (and after the last).
    pub eval_every: Option<usize>,
    pub keep: Keep,
    pub gradient_checkpointing: bool,
    pub padding: PaddingSide,
    pub info_gain: Option<InfoGainConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            optimizer: AdamWConfig::default(),
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: None,
            warmup_ratio: 0.1,
            epochs: 1,
            max_steps: None,
            batch_rows: 16,
            max_batch_tokens: 8192,
            max_grad_norm: Some(1.0),
            shuffle: true,
            seed: 2025,
            eval_every: None,
            keep: Keep::Last,
            gradient_checkpointing: false,
            padding: PaddingSide::Right,
            info_gain: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        let bad = |m: String| Err(ModelError::Config(m));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("lr = {}: must be >= 0", self.lr));
        }
        if self.batch_rows == 0 {
            return bad("batch_rows must be >= 1".into());
        }
        if self.max_batch_tokens == 0 {
            return bad("max_batch_tokens must be >= 1".into());
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs must be >= 1 (or set max_steps)".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be >= 1".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio = {}: must be in [0, 1)",
                self.warmup_ratio
            ));
        }
        let o = &self.optimizer;
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return bad(format!(
                "adam betas ({}, {}) must be in [0, 1)",
                o.beta1, o.beta2
            ));
        }
        if !(o.eps.is_finite()
            && o.eps > 0.0
            && o.weight_decay.is_finite()
            && o.weight_decay >= 0.0)
        {
            return bad(format!(
                "adam eps = {} must be > 0 and weight_decay = {} >= 0",
                o.eps, o.weight_decay
            ));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!("max_grad_norm = {n}: must be > 0"));
            }
        }
        if self.eval_every == Some(0) {
            return bad("eval_every must be >= 1".into());
        }
        if let Some(ig) = &self.info_gain {
            ig.validate()?;
        }
        Ok(())
    }
}

/// The metrics of one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based.
    pub step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    pub lr: f64,
    pub terms: LossTerms,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    pub rows: usize,
    pub tokens: usize,
    pub micro_batches: usize,
    pub seconds: f64,
    /// Where the step's time went: forward passes (with the loss), backward passes
    /// (with the recomputation under checkpointing), clipping and the optimizer.
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub optimizer_seconds: f64,
}

impl StepMetrics {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// An evaluation of the dev rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: usize,
    pub epoch: f64,
    pub rows: usize,
    pub log_loss: f64,
    pub accuracy: f64,
}

/// What the training loop reports, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Step(StepMetrics),
    Eval(EvalMetrics),
}
