//! Qwen2 and Qwen2.5: `Qwen2ForSequenceClassification`. The Llama block with biases on the
//! query, key and value projections.

use serde::Deserialize;

use super::{CommonConfig, DecoderConfig, Family};
use crate::config_bail;
use crate::error::Result;

/// The fields of a Hugging Face Qwen2 `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_act() -> String {
    "silu".into()
}

impl Config {
    pub fn decoder_config(&self, raw: &serde_json::Value) -> Result<DecoderConfig> {
        if self.use_sliding_window {
            config_bail!(
                "qwen2: use_sliding_window = true is not supported (no released Qwen2 \
                 checkpoint turns it on); set it to false"
            );
        }
        let head_dim = self.common.hidden_size / self.common.num_attention_heads;
        Ok(DecoderConfig {
            qkv_bias: true,
            tie_word_embeddings: self.tie_word_embeddings,
            ..self
                .common
                .decoder(Family::Qwen2, head_dim, &self.hidden_act, raw)?
        })
    }
}
