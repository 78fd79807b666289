//! LoRA adapters in PEFT's terms (`target_modules`, `layers_to_transform`, `r`,
//! `lora_alpha`, `lora_dropout`, `use_rslora`, `modules_to_save`), on the seven projections
//! of a decoder layer; [`crate::layers::linear::Linear`] carries them.

use std::path::Path;

use candle_core::Var;
use serde::{Deserialize, Serialize};

use crate::config_bail;
use crate::error::{ModelError, Result};

/// A linear projection of a decoder layer, by its module name in transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The module path inside layer `layer`, as in the checkpoint.
    pub fn path(self, layer: usize) -> String {
        let block = match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.module_name())
    }
}

/// `target_modules` of PEFT: module names, a regular expression over module paths, or
/// `all-linear` (every projection; never the score head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

/// `layers_to_transform` of PEFT: one layer or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelection {
    One(usize),
    Many(Vec<usize>),
}

/// The fields of PEFT's `adapter_config.json` for a LoRA adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub layers_to_transform: Option<LayerSelection>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    pub exclude_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn lora_type() -> String {
    "LORA".into()
}

fn bias_none() -> String {
    "none".into()
}

impl LoraConfig {
    /// The recipe's shape: all seven projections, every layer, score head trained.
    pub fn all_linear(rank: usize, alpha: f64, dropout: f64) -> Self {
        Self {
            peft_type: lora_type(),
            r: rank,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::Names(
                Projection::ALL
                    .iter()
                    .map(|p| p.module_name().to_string())
                    .collect(),
            ),
            layers_to_transform: None,
            modules_to_save: Some(vec!["score".into()]),
            use_rslora: false,
            use_dora: false,
            bias: bias_none(),
            fan_in_fan_out: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            lora_bias: false,
            layer_replication: None,
            exclude_modules: None,
            task_type: Some("SEQ_CLS".into()),
            base_model_name_or_path: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::file(path, format!("not a LoRA adapter config: {e}")))?;
        config
            .validate()
            .map_err(|e| ModelError::file(path, e.to_string()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            config_bail!("peft_type is `{}`; only LORA adapters load", self.peft_type);
        }
        if self.r == 0 {
            config_bail!("r must be positive");
        }
        if self.use_dora {
            config_bail!("use_dora = true (DoRA) is not supported");
        }
        if self.bias != "none" {
            config_bail!("bias = `{}` is not supported (only `none`)", self.bias);
        }
        if self.fan_in_fan_out {
            config_bail!("fan_in_fan_out = true is for GPT-2's Conv1D; these models use Linear");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            config_bail!("rank_pattern / alpha_pattern are not supported");
        }
        if self.lora_bias {
            config_bail!("lora_bias = true is not supported");
        }
        if self
            .layer_replication
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            config_bail!("layer_replication is not supported");
        }
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            config_bail!("exclude_modules is not supported");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            config_bail!("lora_dropout {} is not in [0, 1)", self.lora_dropout);
        }
        if let TargetModules::Pattern(pattern) = &self.target_modules {
            if pattern != "all-linear" {
                regex_full(pattern)?;
            }
        }
        Ok(())
    }

    /// PEFT's scaling of the low-rank update: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether the score head is a trained copy saved with the adapter.
    pub fn saves_score_head(&self) -> bool {
        self.modules_to_save
            .as_ref()
            .is_some_and(|m| m.iter().any(|name| name == "score"))
    }

    /// Whether `projection` of `layer` carries an adapter.
    pub fn targets(&self, projection: Projection, layer: usize) -> Result<bool> {
        if let Some(layers) = &self.layers_to_transform {
            let chosen = match layers {
                LayerSelection::One(l) => *l == layer,
                LayerSelection::Many(ls) => ls.contains(&layer),
            };
            if !chosen {
                return Ok(false);
            }
        }
        Ok(match &self.target_modules {
            TargetModules::Names(names) => names.iter().any(|n| {
                // PEFT matches a name against the module path's last components.
                let path = projection.path(layer);
                path == *n || path.ends_with(&format!(".{n}"))
            }),
            TargetModules::Pattern(p) if p == "all-linear" => true,
            TargetModules::Pattern(p) => regex_full(p)?
                .is_match(&projection.path(layer))
                .unwrap_or(false),
        })
    }
}

fn regex_full(pattern: &str) -> Result<fancy_regex::Regex> {
    fancy_regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| ModelError::Config(format!("target_modules `{pattern}`: {e}")))
}

/// The low-rank update of one projection: `B(A(dropout(x))) * scaling`, with A and B as
/// trainable variables.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `lora_A`: rank x in.
    pub a: Var,
    /// `lora_B`: out x rank.
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    /// The adapter's matmuls in the model's dtype, as under `torch.autocast` (what
    /// transformers' Trainer with `bf16=True` runs), instead of PEFT's f32: the f32 weights are
    /// cast for them and get f32 gradients; the update comes out of its matmul in the model's
    /// dtype, is scaled in f32 and rounded, then added and rounded (PyTorch's order).
    pub autocast: bool,
}

impl LoraWeights {
    /// The dtype of the adapter's matmuls in a model of dtype `model`: the model's under
    /// autocast, else the adapter's own.
    pub fn adapter_dtype(&self, model: candle_core::DType) -> candle_core::DType {
        if self.autocast {
            model
        } else {
            self.a.dtype()
        }
    }
}
