//! The optimiser as torch and transformers do it: `torch.optim.AdamW` (decoupled weight
//! decay, bias-corrected moments in f32), `torch.nn.utils.clip_grad_norm_`, and the
//! `get_{constant,linear,cosine}_schedule_with_warmup` learning-rate multipliers.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(ModelError::Config(format!(
                "schedule `{other}` is not one of cosine, linear, constant"
            ))),
        }
    }
}

impl Schedule {
    /// transformers' multiplier λ(step) for optimizer step `step` (from 0) of `total`.
    pub fn multiplier(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Self::Constant => 1.0,
            Self::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Self::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

/// AdamW's settings (torch's defaults but for the recipe's β₂).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// torch's AdamW over a fixed list of variables, with its first and second moments.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub steps: u64,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, vars: &[Var]) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            config,
            steps: 0,
            exp_avg: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            exp_avg_sq: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One step at learning rate `lr`, as `torch.optim.AdamW`'s single-tensor path:
    /// p ← p·(1 − lr·wd); m ← m + (1 − β₁)(g − m); v ← β₂v + (1 − β₂)g²;
    /// p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε). On a GPU (f32 variables) every
    /// tensor in place in one launch (`ops::optim`).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(vars, grads, lr, 1.0)
    }

    /// torch's `clip_grad_norm_(max_norm)` then [`AdamW::step`]: returns the gradients'
    /// global 2-norm before clipping. On a GPU the norm is one launch and the clipping
    /// coefficient goes into the AdamW launch (the gradients are left as they are); on the
    /// CPU the gradients are clipped first, as torch does.
    pub fn step_clipped(
        &mut self,
        vars: &[Var],
        grads: &mut [Tensor],
        lr: f64,
        max_norm: Option<f64>,
    ) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if vars
            .first()
            .is_some_and(|v| v.device().is_cuda() && v.dtype() == DType::F32)
        {
            let total = grad_norm_cuda(grads)?;
            self.step_scaled(vars, grads, lr, clip_coefficient(total, max_norm))?;
            return Ok(total);
        }
        let total = clip_grad_norm(grads, max_norm)?;
        self.step_scaled(vars, grads, lr, 1.0)?;
        Ok(total)
    }

    /// [`AdamW::step`] of the gradients times `grad_scale` (only a GPU takes a scale other
    /// than 1: the CPU's callers clip the gradients themselves).
    fn step_scaled(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if vars.len() != grads.len() || vars.len() != self.exp_avg.len() {
            return Err(ModelError::Input(format!(
                "AdamW: {} variables, {} gradients, {} moments",
                vars.len(),
                grads.len(),
                self.exp_avg.len()
            )));
        }
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let step_size = lr / (1.0 - c.beta1.powi(t));
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        #[cfg(feature = "cuda")]
        if vars
            .first()
            .is_some_and(|v| v.device().is_cuda() && v.dtype() == DType::F32)
        {
            let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            crate::ops::optim::adamw_step_all(
                &params,
                &self.exp_avg,
                &self.exp_avg_sq,
                grads,
                crate::ops::optim::AdamWStep {
                    beta1: c.beta1 as f32,
                    beta2: c.beta2 as f32,
                    decay: (1.0 - lr * c.weight_decay) as f32,
                    bias_correction2_sqrt: bias_correction2_sqrt as f32,
                    eps: c.eps as f32,
                    step_size: step_size as f32,
                    grad_scale: grad_scale as f32,
                },
            )?;
            return Ok(());
        }
        if grad_scale != 1.0 {
            return Err(ModelError::Input(
                "AdamW: a gradient scale is for the GPU's fused step; clip on the CPU first".into(),
            ));
        }
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let grad = grad.to_dtype(var.dtype())?;
            let param = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let m = (&self.exp_avg[i] + ((&grad - &self.exp_avg[i])? * (1.0 - c.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + c.eps)?;
            let update = ((&m / denom)? * step_size)?;
            var.set(&(param - update)?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }
}

/// The global 2-norm of gradients on a GPU: one launch for every tensor's sum of squares.
#[cfg(feature = "cuda")]
fn grad_norm_cuda(grads: &[Tensor]) -> Result<f64> {
    let sums = crate::ops::optim::sums_of_squares(grads)?;
    Ok(sums.iter().map(|&s| s as f64).sum::<f64>().sqrt())
}

/// torch's clipping coefficient: min(1, max_norm / (total + 1e-6)); 1 without a max_norm.
fn clip_coefficient(total: f64, max_norm: Option<f64>) -> f64 {
    max_norm.map_or(1.0, |max_norm| (max_norm / (total + 1e-6)).min(1.0))
}

/// torch's `clip_grad_norm_`: the global 2-norm of all gradients (returned, before
/// clipping); when `max_norm` is set every gradient is multiplied by
/// min(1, max_norm / (norm + 1e-6)). On a GPU the squares are summed by one kernel per
/// tensor (`ops::optim::sums_of_squares`).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: Option<f64>) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if grads.first().is_some_and(|g| g.device().is_cuda()) {
        let total = grad_norm_cuda(grads)?;
        return scale_to(grads, total, max_norm);
    }
    let mut squares = Vec::with_capacity(grads.len());
    for g in grads.iter() {
        let norm = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?;
        squares.push(norm.sqr()?);
    }
    let total = if squares.is_empty() {
        0.0
    } else {
        Tensor::stack(&squares, 0)?
            .sum_all()?
            .sqrt()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
    };
    scale_to(grads, total, max_norm)
}

/// Multiplies every gradient by min(1, max_norm / (total + 1e-6)); returns total. A
/// coefficient of exactly 1 (the norm within bounds) leaves the gradients as they are:
/// the same bits as multiplying, without one pass per tensor.
fn scale_to(grads: &mut [Tensor], total: f64, max_norm: Option<f64>) -> Result<f64> {
    let coef = clip_coefficient(total, max_norm);
    if coef != 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' schedules, values computed by hand from their definitions.
    #[test]
    fn schedules_match_transformers() {
        // Warm-up 2 of 10: 0, 0.5, then the shape.
        for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            assert_eq!(s.multiplier(0, 2, 10), 0.0);
            assert_eq!(s.multiplier(1, 2, 10), 0.5);
            assert_eq!(s.multiplier(2, 2, 10), 1.0);
        }
        assert_eq!(Schedule::Linear.multiplier(6, 2, 10), 0.5);
        assert!((Schedule::Cosine.multiplier(6, 2, 10) - 0.5).abs() < 1e-15);
        let c = Schedule::Cosine.multiplier(4, 2, 10);
        assert!((c - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-15);
        assert_eq!(Schedule::Linear.multiplier(10, 2, 10), 0.0);
        assert_eq!(Schedule::Constant.multiplier(9, 0, 10), 1.0);
        // No warm-up: step 0 runs at the full rate.
        assert_eq!(Schedule::Cosine.multiplier(0, 0, 10), 1.0);
    }
}
