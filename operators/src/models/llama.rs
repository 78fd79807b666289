//! Llama (Llama-2, Llama-3, Llama-3.1 with `rope_scaling` of type `llama3`):
//! `LlamaForSequenceClassification`.

use serde::Deserialize;

use super::{
    num_labels_of, rope_of, Activation, DecoderConfig, Family, NormStyle, RawRope, SlidingWindow,
};
use crate::error::Result;

/// The fields of a Hugging Face Llama `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
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
        let heads = self.num_attention_heads;
        Ok(DecoderConfig {
            family: Family::Llama,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            rms_norm_eps: self.rms_norm_eps,
            rope: rope_of(&self.rope)?,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            activation: Activation::from_hf(&self.hidden_act)?,
            norm: NormStyle::Llama,
            attn_logit_softcap: None,
            query_scale: (self.head_dim.unwrap_or(self.hidden_size / heads) as f64).powf(-0.5),
            sliding_window: None::<SlidingWindow>,
            num_labels: num_labels_of(raw),
            pad_token_id: self.pad_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}
