//! Gemma-2: `Gemma2ForSequenceClassification`. Embeddings scaled by sqrt(hidden), (1 + w)
//! RMSNorm before and after attention and MLP, attention-logit soft-capping,
//! `query_pre_attn_scalar`, sliding-window attention on alternating layers,
//! gelu_pytorch_tanh.

use serde::Deserialize;

use super::{CommonConfig, DecoderConfig, Family, NormStyle, SlidingWindow};
use crate::config_bail;
use crate::error::Result;

/// The fields of a Hugging Face Gemma-2 `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub head_dim: usize,
    pub hidden_activation: Option<String>,
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub sliding_window: Option<usize>,
    /// `sliding_attention` or `full_attention` per layer (transformers >= 4.53 writes it).
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

impl Config {
    pub fn decoder_config(&self, raw: &serde_json::Value) -> Result<DecoderConfig> {
        if self.use_bidirectional_attention == Some(true) {
            config_bail!("gemma2: use_bidirectional_attention = true is not supported");
        }
        let activation = self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
            .unwrap_or("gelu_pytorch_tanh");
        // Older configs have no `layer_types`: even layers slide, odd layers see everything.
        let sliding_layers: Vec<bool> = match &self.layer_types {
            Some(types) => {
                if types.len() != self.common.num_hidden_layers {
                    config_bail!(
                        "gemma2: layer_types has {} entries for {} layers",
                        types.len(),
                        self.common.num_hidden_layers
                    );
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(crate::error::ModelError::Config(format!(
                            "gemma2: unknown layer type `{other}`"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..self.common.num_hidden_layers)
                .map(|i| i % 2 == 0)
                .collect(),
        };
        let sliding_window = self.sliding_window.map(|size| SlidingWindow {
            size,
            layers: sliding_layers,
        });
        Ok(DecoderConfig {
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            norm: NormStyle::Gemma,
            attn_logit_softcap: self.attn_logit_softcapping,
            query_scale: self.query_pre_attn_scalar.powf(-0.5),
            sliding_window,
            // Gemma-2 always ties its LM head to the embeddings.
            tie_word_embeddings: true,
            ..self
                .common
                .decoder(Family::Gemma2, self.head_dim, activation, raw)?
        })
    }
}
