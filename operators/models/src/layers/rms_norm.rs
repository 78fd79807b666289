//! RMSNorm in f32. Llama: the weight times the normalised input cast back; Gemma: the
//! normalised input times (1 + w) in f32, cast back (the weight is kept as 1 + w in f32),
//! saturating at f16's largest finite value in an f16 model.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::models::{adapter_dtype, DecoderConfig, NormStyle};
use crate::ops::F16_MAX;
use crate::profile;
use crate::weights::Weights;

use super::Kernels;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Llama: w in the model dtype; Gemma: 1 + w in f32.
    weight: Tensor,
    eps: f64,
    style: NormStyle,
    /// The model dtype.
    dtype: DType,
    /// arenaflow's GPU kernel in inference.
    fused: bool,
    /// The residual add before it in the same pass, in inference ([`Kernels::add_norm`]).
    add_norm: bool,
}

impl RmsNorm {
    /// `weight` (hidden) under `vb`.
    pub fn new(cfg: &DecoderConfig, vb: &Weights, kernels: Kernels) -> Result<Self> {
        let h = cfg.hidden_size;
        let weight = match cfg.norm {
            NormStyle::Llama => vb.get("weight", &[h])?,
            NormStyle::Gemma => (vb.get_as("weight", &[h], adapter_dtype(vb.dtype()))? + 1.0)?,
        };
        Ok(Self {
            weight,
            eps: cfg.rms_norm_eps,
            style: cfg.norm,
            dtype: vb.dtype(),
            fused: kernels.gpu,
            add_norm: kernels.add_norm,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        profile::time(xs.device(), "norms", || self.normalise(xs, train))
    }

    /// The residual add `residual + h` and this norm of the sum: (sum, normalised). In
    /// inference where the model's kernels say so ([`Kernels::add_norm`]), one pass on the
    /// GPU (`ops::rms_norm::add_rms_norm`, the same bits); otherwise the add, then the norm.
    pub fn add_forward_t(
        &self,
        residual: &Tensor,
        h: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let dev = residual.device();
        if self.add_norm && !train {
            let (w, eps, gemma) = (
                &self.weight,
                self.eps as f32,
                self.style == NormStyle::Gemma,
            );
            return profile::time(dev, "norms", || {
                Ok(crate::ops::rms_norm::add_rms_norm(
                    residual, h, w, eps, gemma,
                )?)
            });
        }
        let sum = profile::time(dev, "residual", || residual_add(residual, h))?;
        let normalised = self.forward_t(&sum, train)?;
        Ok((sum, normalised))
    }

    fn normalise(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // The fused op has a backward pass for the input: training on a GPU runs it too.
        if self.fused && (!train || xs.device().is_cuda()) {
            return Ok(crate::ops::rms_norm::rms_norm(
                xs,
                &self.weight,
                self.eps as f32,
                self.style == NormStyle::Gemma,
            )?);
        }
        if !train && self.dtype == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(xs, &self.weight, self.eps as f32)?);
        }
        let internal = adapter_dtype(self.dtype);
        let x = xs.to_dtype(internal)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        Ok(match self.style {
            NormStyle::Llama => normed.to_dtype(self.dtype)?.broadcast_mul(&self.weight)?,
            NormStyle::Gemma => {
                let out = normed.broadcast_mul(&self.weight.to_dtype(internal)?)?;
                saturate_f16(&out, self.dtype)?.to_dtype(self.dtype)?
            }
        })
    }

    /// The weight as the checkpoint stores it (Gemma's without the 1 +).
    pub fn stored_weight(&self) -> Result<Tensor> {
        Ok(match self.style {
            NormStyle::Llama => self.weight.clone(),
            NormStyle::Gemma => (&self.weight - 1.0)?.to_dtype(self.dtype)?,
        })
    }
}

/// `residual + h`; in an f16 model added in f32 and saturated at f16's largest finite
/// value, so that a residual stream outgrowing f16 (Gemma-2's does) stays finite.
pub(crate) fn residual_add(residual: &Tensor, h: &Tensor) -> Result<Tensor> {
    if residual.dtype() != DType::F16 {
        return Ok((residual + h)?);
    }
    let sum = (residual.to_dtype(DType::F32)? + h.to_dtype(DType::F32)?)?;
    Ok(saturate_f16(&sum, DType::F16)?.to_dtype(DType::F16)?)
}

/// `xs` (f32) clamped to f16's finite range when it is about to be rounded to f16
/// (`dtype`), as it is; the guard of Gemma-2's f16 forward.
pub(crate) fn saturate_f16(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F16 {
        Ok(xs.clamp(-F16_MAX, F16_MAX)?)
    } else {
        Ok(xs.clone())
    }
}
