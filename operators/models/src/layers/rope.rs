//! Rotary position embeddings as transformers computes them (f32 inverse frequencies, with
//! Llama-3.1's scaling), applied in the layout of the attention that runs: (b, s, heads, d)
//! for the fused op, (b, heads, s, d) for the composed one.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::models::{DecoderConfig, RopeScaling};
use crate::profile;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &DecoderConfig) -> Self {
        Self {
            inv_freq: inverse_frequencies(cfg),
        }
    }

    /// cos and sin of every position (f32 angles), in `dtype`.
    pub fn tables(
        &self,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotates q and k, (b, s, heads, d), for the fused attention.
pub fn apply_thd(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    profile::time(q.device(), "rope", || {
        Ok((
            candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?,
            candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?,
        ))
    })
}

/// Rotates q and k, (b, heads, s, d); in training through ops autograd differentiates.
pub fn apply_t(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor)> {
    profile::time(q.device(), "rope", || {
        Ok(if train {
            (
                candle_nn::rotary_emb::rope_slow(q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(q, cos, sin)?,
                candle_nn::rotary_emb::rope(k, cos, sin)?,
            )
        })
    })
}

/// RoPE inverse frequencies in f32, with Llama-3.1's scaling, as transformers computes them.
pub fn inverse_frequencies(cfg: &DecoderConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope.theta as f32;
    let default: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match cfg.rope.scaling {
        RopeScaling::None => default,
        RopeScaling::Linear { factor } => default.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}
