//! Qwen2 and Qwen2.5: `Qwen2ForSequenceClassification`. The Llama block with biases on the
//! query, key and value projections.

use serde::Deserialize;

use super::{num_labels_of, rope_of, Activation, DecoderConfig, Family, NormStyle, RawRope};
use crate::config_bail;
use crate::error::Result;

/// The fields of a Hugging Face Qwen2 `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub rope: RawRope,
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
        let heads = self.num_attention_heads;
        let head_dim = self.hidden_size / heads;
        Ok(DecoderConfig {
            family: Family::Qwen2,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope: rope_of(&self.rope)?,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            activation: Activation::from_hf(&self.hidden_act)?,
            norm: NormStyle::Llama,
            attn_logit_softcap: None,
            query_scale: (head_dim as f64).powf(-0.5),
            sliding_window: None,
            num_labels: num_labels_of(raw),
            pad_token_id: self.pad_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}
