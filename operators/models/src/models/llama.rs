//! Llama (Llama-2, Llama-3, Llama-3.1 with `rope_scaling` of type `llama3`):
//! `LlamaForSequenceClassification`.

use serde::Deserialize;

use super::{CommonConfig, DecoderConfig, Family};
use crate::error::Result;

/// The fields of a Hugging Face Llama `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_act() -> String {
    "silu".into()
}

impl Config {
    pub fn decoder_config(&self, raw: &serde_json::Value) -> Result<DecoderConfig> {
        let head_dim = self
            .head_dim
            .unwrap_or(self.common.hidden_size / self.common.num_attention_heads);
        Ok(DecoderConfig {
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            tie_word_embeddings: self.tie_word_embeddings,
            ..self
                .common
                .decoder(Family::Llama, head_dim, &self.hidden_act, raw)?
        })
    }
}
