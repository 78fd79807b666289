//! Sample weights from information gain (the RLP idea of the recipe's notes): a row whose
//! label the teachers find more likely than a reference does is worth more,
//! IG_i = log p_teacher(y_i) − log p_ref(y_i), w_i = clip(1 + λ·tanh(IG_i), w_min, w_max).
//! p_teacher is the mean of the teachers' softmax probabilities (temperature 1); p_ref is
//! the class prior of the training rows (`prior`) or an exponential moving average of the
//! student's own probability of each label, started at the prior and updated after every
//! optimizer step (`ema`).

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InfoGainMode {
    Prior,
    Ema,
}

impl std::str::FromStr for InfoGainMode {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "prior" => Ok(Self::Prior),
            "ema" => Ok(Self::Ema),
            other => Err(ModelError::Config(format!(
                "information-gain mode `{other}` is not one of prior, ema"
            ))),
        }
    }
}

/// The knobs: λ, the clip range and, for `ema`, the decay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InfoGainConfig {
    pub mode: InfoGainMode,
    pub lambda: f64,
    pub w_min: f64,
    pub w_max: f64,
    pub ema_decay: f64,
}

impl Default for InfoGainConfig {
    fn default() -> Self {
        Self {
            mode: InfoGainMode::Prior,
            lambda: 0.5,
            w_min: 0.5,
            w_max: 1.5,
            ema_decay: 0.99,
        }
    }
}

impl InfoGainConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.w_min >= 0.0 && self.w_min <= self.w_max && self.w_max.is_finite()) {
            return Err(ModelError::Config(format!(
                "information-gain weights: need 0 <= w_min ({}) <= w_max ({})",
                self.w_min, self.w_max
            )));
        }
        if !self.lambda.is_finite() || !(0.0..1.0).contains(&self.ema_decay) {
            return Err(ModelError::Config(format!(
                "information-gain lambda = {} must be finite and ema_decay = {} in [0, 1)",
                self.lambda, self.ema_decay
            )));
        }
        Ok(())
    }
}

/// The running state: the reference probability of each class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoGain {
    pub config: InfoGainConfig,
    pub reference: [f64; 3],
}

impl InfoGain {
    /// Starts at the class prior of the training labels.
    pub fn new(config: InfoGainConfig, labels: impl Iterator<Item = u32>) -> Result<Self> {
        let mut counts = [0f64; 3];
        for l in labels {
            counts[l as usize] += 1.0;
        }
        let n: f64 = counts.iter().sum();
        if counts.contains(&0.0) {
            return Err(ModelError::Input(format!(
                "information-gain weights need every class among the training rows (counts {counts:?})"
            )));
        }
        Ok(Self {
            config,
            reference: counts.map(|c| c / n),
        })
    }

    /// The weight of a row with label `label` and the teachers' logits.
    pub fn weight(&self, label: u32, teachers: &[[f32; 3]]) -> f64 {
        let p_teacher = teachers
            .iter()
            .map(|z| softmax(z)[label as usize])
            .sum::<f64>()
            / teachers.len() as f64;
        let gain = p_teacher.ln() - self.reference[label as usize].ln();
        let c = &self.config;
        (1.0 + c.lambda * gain.tanh()).clamp(c.w_min, c.w_max)
    }

    /// After a step (`ema` mode): each class's reference moves toward the mean probability
    /// the student gave the label over the step's rows of that class.
    pub fn update(&mut self, labels: &[u32], student_logits: &[[f32; 3]]) {
        if self.config.mode != InfoGainMode::Ema {
            return;
        }
        let d = self.config.ema_decay;
        for class in 0..3u32 {
            let probs: Vec<f64> = labels
                .iter()
                .zip(student_logits)
                .filter(|(l, _)| **l == class)
                .map(|(_, z)| softmax(z)[class as usize])
                .collect();
            if !probs.is_empty() {
                let mean = probs.iter().sum::<f64>() / probs.len() as f64;
                let r = &mut self.reference[class as usize];
                *r = d * *r + (1.0 - d) * mean;
            }
        }
    }
}

fn softmax(z: &[f32; 3]) -> [f64; 3] {
    let m = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let e = z.map(|v| (v as f64 - m).exp());
    let s: f64 = e.iter().sum();
    e.map(|v| v / s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed: prior (0.5, 0.25, 0.25); teachers' logits (2, 0, 0) and (0, 0, 0) for a
    /// row of label 0: p_teacher = (e²/(e²+2) + 1/3) / 2 = 0.5360...
    #[test]
    fn weights_are_the_formula() {
        let config = InfoGainConfig {
            mode: InfoGainMode::Ema,
            lambda: 0.8,
            w_min: 0.6,
            w_max: 1.4,
            ema_decay: 0.9,
        };
        let mut ig = InfoGain::new(config, [0u32, 0, 1, 2].into_iter()).unwrap();
        assert_eq!(ig.reference, [0.5, 0.25, 0.25]);
        let e2 = 2f64.exp();
        let p = (e2 / (e2 + 2.0) + 1.0 / 3.0) / 2.0;
        let w = ig.weight(0, &[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]);
        let expected = 1.0 + 0.8 * (p.ln() - 0.5f64.ln()).tanh();
        assert!((w - expected).abs() < 1e-12, "{w} vs {expected}");
        // A confident teacher on a rare class hits the clip.
        assert_eq!(ig.weight(1, &[[-9.0, 9.0, -9.0]]), 1.4);
        assert_eq!(ig.weight(1, &[[9.0, -9.0, 9.0]]), 0.6);
        // EMA: class 0 seen with student probability 1/3 (uniform logits).
        ig.update(&[0], &[[0.0, 0.0, 0.0]]);
        assert!((ig.reference[0] - (0.9 * 0.5 + 0.1 / 3.0)).abs() < 1e-12);
        assert_eq!(ig.reference[1], 0.25);
    }
}
