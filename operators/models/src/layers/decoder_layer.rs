//! One decoder layer: pre-norm self-attention and gated MLP with residuals, and Gemma-2's
//! sandwich norms (after attention, and before and after the MLP) where the family has them.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::Projection;
use crate::models::{DecoderConfig, NormStyle};
use crate::profile;
use crate::weights::Weights;

use super::attention::SelfAttention;
use super::linear::Linear;
use super::mlp::Mlp;
use super::rms_norm::{residual_add, RmsNorm};
use super::{BatchState, Kernels};

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: SelfAttention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// Gemma-2 only.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
}

impl DecoderLayer {
    /// Layer `index` under `vb` (`model.layers.{index}`).
    pub fn new(cfg: &DecoderConfig, vb: &Weights, index: usize, kernels: Kernels) -> Result<Self> {
        let sliding = cfg
            .sliding_window
            .as_ref()
            .is_some_and(|w| w.layers.get(index).copied().unwrap_or(false));
        let norm = |name: &str| RmsNorm::new(cfg, &vb.pp(name), kernels);
        let gemma = cfg.norm == NormStyle::Gemma;
        Ok(Self {
            self_attn: SelfAttention::new(cfg, &vb.pp("self_attn"), sliding)?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"), kernels)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: gemma
                .then(|| norm("pre_feedforward_layernorm"))
                .transpose()?,
            post_feedforward_layernorm: gemma
                .then(|| norm("post_feedforward_layernorm"))
                .transpose()?,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, state: &BatchState, train: bool) -> Result<Tensor> {
        let (residual, h) = self.forward_pending(xs, None, state, train)?;
        profile::time(xs.device(), "residual", || residual_add(&residual, &h))
    }

    /// The layer with its last residual add left to the caller: (the residual stream
    /// before it, the MLP's output to add). `pending` is the previous layer's MLP output,
    /// still to be added to `xs`: the add then runs with this layer's input norm
    /// (`RmsNorm::add_forward_t`), as the attention's add runs with the norm after it.
    pub fn forward_pending(
        &self,
        xs: &Tensor,
        pending: Option<&Tensor>,
        state: &BatchState,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (residual, h) = match pending {
            Some(p) => self.input_layernorm.add_forward_t(xs, p, train)?,
            None => (xs.clone(), self.input_layernorm.forward_t(xs, train)?),
        };
        let h = self.self_attn.forward_t(&h, state, train)?;
        let (xs, h) = match &self.pre_feedforward_layernorm {
            // Gemma-2 normalises the attention output before the residual add.
            Some(pre) => {
                let h = self.post_attention_layernorm.forward_t(&h, train)?;
                pre.add_forward_t(&residual, &h, train)?
            }
            None => self
                .post_attention_layernorm
                .add_forward_t(&residual, &h, train)?,
        };
        let h = self.mlp.forward_t(&h, train)?;
        let h = match &self.post_feedforward_layernorm {
            Some(post) => post.forward_t(&h, train)?,
            None => h,
        };
        Ok((xs, h))
    }

    pub fn projection(&self, p: Projection) -> &Linear {
        match p {
            Projection::Q => &self.self_attn.q,
            Projection::K => &self.self_attn.k,
            Projection::V => &self.self_attn.v,
            Projection::O => &self.self_attn.o,
            Projection::Gate => &self.mlp.gate,
            Projection::Up => &self.mlp.up,
            Projection::Down => &self.mlp.down,
        }
    }

    pub fn projection_mut(&mut self, p: Projection) -> &mut Linear {
        match p {
            Projection::Q => &mut self.self_attn.q,
            Projection::K => &mut self.self_attn.k,
            Projection::V => &mut self.self_attn.v,
            Projection::O => &mut self.self_attn.o,
            Projection::Gate => &mut self.mlp.gate,
            Projection::Up => &mut self.mlp.up,
            Projection::Down => &mut self.mlp.down,
        }
    }

    /// The norms as the checkpoint names them, for saving.
    pub fn norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        let mut norms = vec![
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
        ];
        if let Some(n) = &self.pre_feedforward_layernorm {
            norms.push(("pre_feedforward_layernorm", n));
        }
        if let Some(n) = &self.post_feedforward_layernorm {
            norms.push(("post_feedforward_layernorm", n));
        }
        norms
    }
}
