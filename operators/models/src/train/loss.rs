//! The distillation loss of the recipe, per row: cross-entropy on the label and, for each
//! teacher t at temperature T, KL(p_t || p_s) and 1 − cos(p_t, p_s) with p = softmax(z / T)
//! (no T² factor), combined as
//! (w_ce·CE + Σ_t (w_kl·KL_t + w_cos·cos_t)) / (w_ce + n_teachers·(w_kl + w_cos)).
//! With unit weights and two teachers that is the 1st place's (CE + KL₁ + cos₁ + KL₂ + cos₂) / 5;
//! with no teachers it is plain cross-entropy.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The weights of the loss terms and the distillation temperature.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub ce_weight: f64,
    pub kl_weight: f64,
    pub cos_weight: f64,
    pub temperature: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            ce_weight: 1.0,
            kl_weight: 1.0,
            cos_weight: 1.0,
            temperature: 1.0,
        }
    }
}

impl LossConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [
            ("ce_weight", self.ce_weight),
            ("kl_weight", self.kl_weight),
            ("cos_weight", self.cos_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(ModelError::Config(format!(
                    "{name} = {w}: loss weights are finite and >= 0"
                )));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(ModelError::Config(format!(
                "temperature = {}: must be > 0",
                self.temperature
            )));
        }
        Ok(())
    }

    /// The normaliser w_ce + n·(w_kl + w_cos).
    fn denominator(&self, teachers: usize) -> Result<f64> {
        let d = self.ce_weight + teachers as f64 * (self.kl_weight + self.cos_weight);
        if d <= 0.0 {
            return Err(ModelError::Config(
                "every loss weight is 0 (with no teacher, ce_weight must be > 0)".into(),
            ));
        }
        Ok(d)
    }
}

/// Each term summed over rows with the rows' scales (a weighted mean when the scales sum
/// to 1): the total and its parts, for reporting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossTerms {
    pub loss: f64,
    pub ce: f64,
    pub kl: Vec<f64>,
    pub cos: Vec<f64>,
}

impl LossTerms {
    pub fn add(&mut self, other: &LossTerms) {
        self.loss += other.loss;
        self.ce += other.ce;
        if self.kl.len() < other.kl.len() {
            self.kl.resize(other.kl.len(), 0.0);
            self.cos.resize(other.cos.len(), 0.0);
        }
        for (a, b) in self.kl.iter_mut().zip(&other.kl) {
            *a += b;
        }
        for (a, b) in self.cos.iter_mut().zip(&other.cos) {
            *a += b;
        }
    }
}

/// Σ_i scale_i · ℓ_i for student logits (rows, 3), labels (rows) u32, each teacher's logits
/// (rows, 3) and the rows' scales (rows): the differentiable scalar and its terms. With
/// scales w_i / Σ_step w, summing over a step's micro-batches gives the step's weighted mean.
pub fn distill_loss(
    logits: &Tensor,
    labels: &Tensor,
    teachers: &[Tensor],
    scales: &Tensor,
    config: &LossConfig,
) -> Result<(Tensor, LossTerms)> {
    let dtype = logits.dtype();
    let scales = scales.to_dtype(dtype)?;
    let weighted = |per_row: &Tensor| -> Result<(Tensor, f64)> {
        let sum = (per_row * &scales)?.sum_all()?;
        let value = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((sum, value))
    };
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let ce = log_p.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let denominator = config.denominator(teachers.len())?;
    let (ce_sum, ce_value) = weighted(&ce)?;
    let mut total = (ce_sum * config.ce_weight)?;
    let mut terms = LossTerms {
        ce: ce_value,
        ..Default::default()
    };
    if !teachers.is_empty() {
        let t = config.temperature;
        let log_ps = candle_nn::ops::log_softmax(&(logits / t)?, D::Minus1)?;
        let ps = log_ps.exp()?;
        let ps_norm = ps.sqr()?.sum(D::Minus1)?.sqrt()?;
        for teacher in teachers {
            let zt = (teacher.to_dtype(dtype)? / t)?;
            let log_pt = candle_nn::ops::log_softmax(&zt, D::Minus1)?;
            let pt = log_pt.exp()?;
            let kl = (&pt * (&log_pt - &log_ps)?)?.sum(D::Minus1)?;
            let dot = (&pt * &ps)?.sum(D::Minus1)?;
            let pt_norm = pt.sqr()?.sum(D::Minus1)?.sqrt()?;
            let cos = (1.0 - (dot / (pt_norm * &ps_norm)?)?)?;
            let (kl_sum, kl_value) = weighted(&kl)?;
            let (cos_sum, cos_value) = weighted(&cos)?;
            total = ((total + (kl_sum * config.kl_weight)?)? + (cos_sum * config.cos_weight)?)?;
            terms.kl.push(kl_value);
            terms.cos.push(cos_value);
        }
    }
    let total = (total / denominator)?;
    terms.loss = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((total, terms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn softmax(z: &[f64], t: f64) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| ((v - m) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// The formula by hand, in f64, against the tensor code.
    #[test]
    fn distill_loss_is_the_formula() {
        let dev = Device::Cpu;
        let student = [[0.3, -1.2, 0.5], [2.0, 0.1, -0.4]];
        let t1 = [[1.0, 0.0, -1.0], [0.2, 0.2, 0.9]];
        let t2 = [[-0.5, 1.5, 0.0], [3.0, -2.0, 0.1]];
        let labels = [2u32, 0];
        let weights = [0.7, 1.6];
        let config = LossConfig {
            ce_weight: 1.0,
            kl_weight: 0.5,
            cos_weight: 2.0,
            temperature: 2.0,
        };
        let mut expected = 0.0;
        let total_w: f64 = weights.iter().sum();
        for i in 0..2 {
            let p = softmax(&student[i], 1.0);
            let ce = -p[labels[i] as usize].ln();
            let ps = softmax(&student[i], 2.0);
            let mut row = config.ce_weight * ce;
            for teacher in [&t1, &t2] {
                let pt = softmax(&teacher[i], 2.0);
                let kl: f64 = (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum();
                let dot: f64 = (0..3).map(|c| pt[c] * ps[c]).sum();
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let cos = 1.0 - dot / (norm(&pt) * norm(&ps));
                row += config.kl_weight * kl + config.cos_weight * cos;
            }
            expected += weights[i] / total_w * row / (1.0 + 2.0 * 2.5);
        }
        let t = |v: &[[f64; 3]; 2]| Tensor::new(v, &dev).unwrap();
        let scales = Tensor::new(&[weights[0] / total_w, weights[1] / total_w], &dev).unwrap();
        let (loss, terms) = distill_loss(
            &t(&student),
            &Tensor::new(&labels, &dev).unwrap(),
            &[t(&t1), t(&t2)],
            &scales,
            &config,
        )
        .unwrap();
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert_eq!(terms.kl.len(), 2);
        assert!((terms.loss - expected).abs() < 1e-12);
    }
}
