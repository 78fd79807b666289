//! A linear projection `x W^T + b` of the decoder: a frozen weight in its storage slot and
//! an optional LoRA update ([`crate::lora::LoraWeights`]) that it carries.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::lora::LoraWeights;
use crate::weights::Weights;

/// How a linear layer's weight is stored. Dense (the model dtype) now; group-quantized
/// integers take their place here.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
}

impl LinearWeight {
    /// (out, in).
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
        }
    }

    /// The weight as a dense tensor in its dtype.
    pub fn dense(&self) -> &Tensor {
        match self {
            Self::Dense(w) => w,
        }
    }
}

/// A frozen projection with an optional LoRA update.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
}

impl Linear {
    /// `weight` (out x in) and, with `bias`, `bias` (out) under `vb`.
    pub fn new(vb: &Weights, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out, inp])?;
        let bias = if bias {
            Some(vb.get("bias", &[out])?)
        } else {
            None
        };
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            lora: None,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let base = match &self.weight {
            LinearWeight::Dense(w) => project(xs, self.bias.as_ref(), |flat| {
                crate::ops::frozen::frozen_matmul_t(flat, w)
            })?,
        };
        let Some(lora) = &self.lora else {
            return Ok(base);
        };
        // PEFT runs the adapter in its own (f32) dtype and adds the result in the model's.
        let adapter_dtype = lora.a.dtype();
        let mut x = xs.to_dtype(adapter_dtype)?;
        if train && lora.dropout > 0.0 {
            x = super::dropout::dropout(&x, lora.dropout)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        // Outside training the update is a constant: detached, its result records no
        // backward graph (which would keep every activation of the pass alive).
        let (a, b) = if train {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
        };
        let update = linear(&linear(&x, &a, None)?, &b, None)?;
        // PEFT's `result + lora_B(lora_A(x)) * scaling`: the sum in f32, one rounding.
        crate::ops::lora::lora_add(&base, &update, lora.scaling)
    }

    /// The weight with the update folded in: W + scaling * B A.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let weight = self.weight.dense();
        match &self.lora {
            None => Ok(weight.clone()),
            Some(lora) => {
                let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scaling)?;
                let merged = (weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
                merged.to_dtype(weight.dtype())
            }
        }
    }
}

/// `x W^T (+ b)` over the last dimension of a tensor of any rank.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    project(xs, bias, |flat| flat.matmul(&weight.t()?))
}

/// `matmul(x) (+ b)` over the last dimension of a tensor of any rank, `matmul` taking the
/// rows flattened to (rows, in).
fn project(
    xs: &Tensor,
    bias: Option<&Tensor>,
    matmul: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = xs.dims().to_vec();
    let in_features = dims[dims.len() - 1];
    let rows = xs.elem_count() / in_features.max(1);
    let out = matmul(&xs.reshape((rows, in_features))?)?;
    let out = match bias {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = out.dim(D::Minus1)?;
    out.reshape(out_dims)
}
