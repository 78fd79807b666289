//! Self-attention of a decoder layer: q, k, v projections (with their LoRA), RoPE, causal
//! attention with the padding of [`BatchState`] and this layer's sliding window and
//! soft-cap, and the output projection. The fused op runs where the batch state carries
//! row spans (inference, and training on a GPU); candle's composed ops, over additive
//! masks, otherwise.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::lora::Projection;
use crate::models::{DecoderConfig, PaddedBatch};
use crate::profile;
use crate::weights::Weights;

use super::linear::Linear;
use super::{rope, BatchState, Masking};

#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Multiplies the scores: head_dim^-0.5 or query_pre_attn_scalar^-0.5.
    scale: f64,
    softcap: Option<f64>,
    /// Some(size) on a sliding-window layer.
    window: Option<usize>,
}

impl SelfAttention {
    /// The four projections under `vb` (the layer's `self_attn`); `sliding`: this layer
    /// attends through the config's window.
    pub fn new(cfg: &DecoderConfig, vb: &Weights, sliding: bool) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let proj = |p: Projection, out: usize, inp: usize, bias: bool| {
            Linear::new(&vb.pp(p.module_name()), out, inp, bias)
        };
        Ok(Self {
            q: proj(Projection::Q, q_out, h, cfg.qkv_bias)?,
            k: proj(Projection::K, kv, h, cfg.qkv_bias)?,
            v: proj(Projection::V, kv, h, cfg.qkv_bias)?,
            o: proj(Projection::O, h, q_out, cfg.o_bias)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg.query_scale,
            softcap: cfg.attn_logit_softcap,
            window: match &cfg.sliding_window {
                Some(w) if sliding => Some(w.size),
                _ => None,
            },
        })
    }

    pub fn forward_t(&self, xs: &Tensor, state: &BatchState, train: bool) -> Result<Tensor> {
        match &state.masking {
            Masking::Spans(spans) => self.fused(xs, state, spans, train),
            Masking::Masks { full, sliding } => {
                let mask = match (sliding, self.window) {
                    (Some(m), Some(_)) => m,
                    _ => full,
                };
                self.composed(xs, state, mask, train)
            }
        }
    }

    /// Through the fused op (arenaflow's GPU kernel, or the blocked CPU one): q, k, v stay
    /// (b, s, heads, d), RoPE in that layout, and the output comes back in it, so nothing
    /// is transposed and no mask is built. In training (a GPU) RoPE and attention are the
    /// ops with backward passes.
    fn fused(
        &self,
        xs: &Tensor,
        state: &BatchState,
        spans: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let dev = xs.device();
        let (q, k, v) = profile::time(dev, "attention projections", || {
            Ok((
                self.q.forward_t(xs, train)?.reshape((b, s, nh, hd))?,
                self.k.forward_t(xs, train)?.reshape((b, s, nkv, hd))?,
                self.v.forward_t(xs, train)?.reshape((b, s, nkv, hd))?,
            ))
        })?;
        let (q, k) = if train {
            profile::time(dev, "rope", || {
                Ok((
                    crate::ops::rope::rope_thd(&q, &state.cos, &state.sin)?,
                    crate::ops::rope::rope_thd(&k, &state.cos, &state.sin)?,
                ))
            })?
        } else {
            rope::apply_thd(&q, &k, &state.cos, &state.sin)?
        };
        let out = profile::time(dev, "attention", || {
            let op = crate::ops::attention::Attention {
                scale: self.scale as f32,
                softcap: self.softcap.unwrap_or(0.0) as f32,
                window: self.window.unwrap_or(0) as i32,
                bounds: spans.clone(),
            };
            Ok(if train {
                crate::ops::attention::attention_train(&q, &k, &v, op)?
            } else {
                crate::ops::attention::attention(&q, &k, &v, op)?
            })
        })?;
        profile::time(dev, "attention projections", || {
            Ok(self.o.forward_t(&out.reshape((b, s, nh * hd))?, train)?)
        })
    }

    fn composed(
        &self,
        xs: &Tensor,
        state: &BatchState,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let dtype = xs.dtype();
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let dev = xs.device();
        let (q, k, v) = profile::time(dev, "attention projections", || {
            Ok((
                heads(self.q.forward_t(xs, train)?, nh)?,
                heads(self.k.forward_t(xs, train)?, nkv)?,
                heads(self.v.forward_t(xs, train)?, nkv)?,
            ))
        })?;
        let (q, k) = rope::apply_t(&q, &k, &state.cos, &state.sin, train)?;
        let out = profile::time(dev, "attention", || {
            // Grouped-query attention without copying K and V: the query heads of one KV
            // head are stacked along the sequence axis.
            let group = nh / nkv;
            let q = q.reshape((b, nkv, group * s, hd))?;
            let scores = (q.matmul(&k.t()?)? * self.scale)?;
            let scores = match self.softcap {
                Some(cap) => ((scores / cap)?.tanh()? * cap)?,
                None => scores,
            };
            let scores = scores
                .reshape((b, nh, s, s))?
                .to_dtype(mask.dtype())?
                .broadcast_add(mask)?;
            let probs = if train {
                candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            let probs = probs.to_dtype(dtype)?.reshape((b, nkv, group * s, s))?;
            let out = probs.matmul(&v)?;
            Ok(out
                .reshape((b, nh, s, hd))?
                .transpose(1, 2)?
                .reshape((b, s, nh * hd))?)
        })?;
        profile::time(dev, "attention projections", || {
            Ok(self.o.forward_t(&out, train)?)
        })
    }
}

/// The additive attention mask (rows x 1 x s x s, f32): a query sees a key at or before it,
/// that is not padding, and, with a window, fewer than `window` positions back. A query with
/// nothing to see (left padding) gets a uniform row, as transformers' finite minimum gives.
pub fn attention_mask(
    batch: &PaddedBatch,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let (b, s) = (batch.rows, batch.seq_len);
    let mut mask = vec![f32::MIN; b * s * s];
    for row in 0..b {
        let keys = &batch.attention_mask[row * s..(row + 1) * s];
        for q in 0..s {
            let first = match window {
                Some(w) => (q + 1).saturating_sub(w),
                None => 0,
            };
            let out = &mut mask[(row * s + q) * s..(row * s + q + 1) * s];
            for k in first..=q {
                if keys[k] != 0 {
                    out[k] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (b, 1, s, s), device)?)
}
