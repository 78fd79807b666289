//! The three model families of the recipe as 3-class sequence classifiers: Llama-3, Qwen2
//! and Gemma-2, with the semantics of transformers' `*ForSequenceClassification`. Each
//! family's file reads its `config.json`; the one classifier in [`classifier`] runs them
//! all over the layers of [`crate::layers`], so training and inference share one
//! implementation (DESIGN.md rules 2 and 4).

pub mod batch;
pub mod classifier;
pub mod gemma2;
pub mod llama;
pub mod qwen2;

use std::path::Path;

use serde::Deserialize;

use crate::config_bail;
use crate::error::{ModelError, Result};

pub use crate::ops::gated::Activation;
pub use batch::{PaddedBatch, PaddingSide};
pub use classifier::{HeadInit, ScoreHead, SequenceClassifier};

/// The dtype trainable tensors live in: f32 under a half-precision model, as PEFT keeps them.
pub fn adapter_dtype(model_dtype: candle_core::DType) -> candle_core::DType {
    match model_dtype {
        candle_core::DType::F64 => candle_core::DType::F64,
        _ => candle_core::DType::F32,
    }
}

/// A model family of the recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Gemma2,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "gemma2" => Ok(Self::Gemma2),
            other => Err(ModelError::Config(format!(
                "model_type `{other}` is not supported (llama, qwen2 and gemma2 are)"
            ))),
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma2 => "gemma2",
        }
    }
}

/// The activation of the gated MLP, by its transformers name.
impl Activation {
    pub fn from_hf(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::GeluErf),
            other => Err(ModelError::Config(format!(
                "hidden activation `{other}` is not supported (silu, gelu_pytorch_tanh, gelu are)"
            ))),
        }
    }
}

/// How the RMSNorm weight is applied: Llama's `w * x`, Gemma's `(1 + w) * x` (in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormStyle {
    Llama,
    Gemma,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Llama-3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Sliding-window attention: a query sees keys fewer than `size` positions back, on the
/// layers marked `true`.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    pub layers: Vec<bool>,
}

/// Everything the decoder needs, whatever the family.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    pub norm: NormStyle,
    pub attn_logit_softcap: Option<f64>,
    /// Multiplies the attention scores: head_dim^-0.5, or query_pre_attn_scalar^-0.5.
    pub query_scale: f64,
    pub sliding_window: Option<SlidingWindow>,
    /// From `id2label` when the checkpoint is a classifier.
    pub num_labels: Option<usize>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
}

impl DecoderConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            config_bail!(
                "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.family.model_type(),
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            config_bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        if let Some(labels) = self.num_labels {
            if labels != 3 {
                config_bail!(
                    "the checkpoint is a classifier with {labels} labels; the preference task needs 3 (A, B, tie)"
                );
            }
        }
        Ok(())
    }

    /// Parameters outside the embedding (for FLOP counts): attention, MLP and norms.
    pub fn non_embedding_parameters(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attention = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * i;
        self.num_layers * (attention + mlp)
    }
}

/// The fields every family's `config.json` shares.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    #[serde(flatten)]
    pub rope: RawRope,
}

impl CommonConfig {
    /// The Llama block with these sizes (no biases, Llama's norm, head_dim^-0.5 scaling);
    /// each family's file changes what differs.
    pub(crate) fn decoder(
        &self,
        family: Family,
        head_dim: usize,
        activation: &str,
        raw: &serde_json::Value,
    ) -> Result<DecoderConfig> {
        Ok(DecoderConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope: rope_of(&self.rope)?,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            activation: Activation::from_hf(activation)?,
            norm: NormStyle::Llama,
            attn_logit_softcap: None,
            query_scale: (head_dim as f64).powf(-0.5),
            sliding_window: None,
            num_labels: num_labels_of(raw),
            pad_token_id: self.pad_token_id,
            tie_word_embeddings: false,
        })
    }
}

/// The rope fields of a config.json, as transformers 4 (`rope_theta`, `rope_scaling`) or 5
/// (`rope_parameters`) writes them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRope {
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
}

fn rope_of(raw: &RawRope) -> Result<RopeConfig> {
    let params = raw
        .rope_parameters
        .as_ref()
        .or(raw.rope_scaling.as_ref())
        .filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64())
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    let Some(params) = params else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let kind = params
        .get("rope_type")
        .or(params.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let number = |key: &str| -> Result<f64> {
        params.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
            ModelError::Config(format!("rope scaling `{kind}` needs a number `{key}`"))
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        },
        other => config_bail!("rope type `{other}` is not supported (default, linear, llama3 are)"),
    };
    Ok(RopeConfig { theta, scaling })
}

fn num_labels_of(raw: &serde_json::Value) -> Option<usize> {
    raw.get("id2label")
        .and_then(|m| m.as_object())
        .map(|m| m.len())
        .or_else(|| {
            raw.get("num_labels")
                .and_then(|n| n.as_u64())
                .map(|n| n as usize)
        })
}

/// What kind of checkpoint `architectures` says this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointHead {
    /// `*ForSequenceClassification`: carries `score.weight`.
    Classifier,
    /// `*ForCausalLM`: carries `lm_head.weight` (unless tied), which the classifier drops.
    CausalLm,
    /// No `architectures` (bare `*Model`): neither head.
    Bare,
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub decoder: DecoderConfig,
    pub head: CheckpointHead,
    /// A GPTQ checkpoint's settings (`quantization_config`).
    pub gptq: Option<crate::gptq::GptqSettings>,
    /// The JSON as read, for writing a merged model's config back out.
    pub raw: serde_json::Value,
}

impl ModelConfig {
    pub fn from_json(raw: serde_json::Value) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::Config("config.json has no `model_type`".into()))?;
        let family = Family::from_model_type(model_type)?;
        let parse_err = |e: serde_json::Error| ModelError::Config(format!("{model_type}: {e}"));
        let decoder = match family {
            Family::Llama => serde_json::from_value::<llama::Config>(raw.clone())
                .map_err(parse_err)?
                .decoder_config(&raw)?,
            Family::Qwen2 => serde_json::from_value::<qwen2::Config>(raw.clone())
                .map_err(parse_err)?
                .decoder_config(&raw)?,
            Family::Gemma2 => serde_json::from_value::<gemma2::Config>(raw.clone())
                .map_err(parse_err)?
                .decoder_config(&raw)?,
        };
        decoder.validate()?;
        let head = match raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
        {
            Some(arch) if arch.ends_with("ForSequenceClassification") => CheckpointHead::Classifier,
            Some(arch) if arch.ends_with("ForCausalLM") => CheckpointHead::CausalLm,
            Some(arch) if arch.ends_with("Model") => CheckpointHead::Bare,
            Some(arch) => config_bail!("architecture `{arch}` is not a decoder this crate runs"),
            None => CheckpointHead::Bare,
        };
        let gptq = crate::gptq::GptqSettings::from_config(&raw)?;
        Ok(Self {
            decoder,
            head,
            gptq,
            raw,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::file(path, format!("not JSON: {e}")))?;
        Self::from_json(raw).map_err(|e| match e {
            ModelError::Config(message) => ModelError::file(path, message),
            other => other,
        })
    }
}
