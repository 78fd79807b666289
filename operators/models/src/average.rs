//! LoRA fold averaging (recipe stage 6): N PEFT adapters of one configuration into one.
//!
//! Mode `delta` ([`average_merged`]): the exact weighted mean of the folds' merged updates
//! scale·B·A on the base, written as a merged model folder (a mean of A and of B is not a
//! mean of B·A). Mode `mean` (the 1st place's): every tensor of the adapters (`lora_A`, `lora_B`, the
//! score head) is the weighted mean of the folds' tensors. The adapters must agree on
//! every field of `adapter_config.json` and on their tensors' names and shapes; the first
//! difference is an error naming both folders. Fold weights are `uniform` or
//! `group_relative`: w_f ∝ exp(A_f / τ) with A_f = mean_g NLL_g − NLL_f over the folds'
//! held-out log losses, so a weak fold weighs less and none is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{write_folder, write_json, write_safetensors};
use crate::error::{ModelError, Result};

/// How the folds are weighed.
#[derive(Debug, Clone, PartialEq)]
pub enum FoldWeights {
    Uniform,
    /// exp((mean NLL − NLL_f) / tau), normalised; one held-out log loss per fold.
    GroupRelative {
        log_losses: Vec<f64>,
        tau: f64,
    },
}

impl FoldWeights {
    /// The weight of each of `n` folds, summing to 1.
    pub fn weights(&self, n: usize) -> Result<Vec<f64>> {
        match self {
            Self::Uniform => Ok(vec![1.0 / n as f64; n]),
            Self::GroupRelative { log_losses, tau } => {
                if log_losses.len() != n {
                    return Err(ModelError::Input(format!(
                        "group_relative weights: {} held-out log losses for {n} adapters",
                        log_losses.len()
                    )));
                }
                if !(*tau > 0.0 && tau.is_finite()) {
                    return Err(ModelError::Input(format!(
                        "group_relative weights: tau = {tau}; expected a positive number"
                    )));
                }
                if let Some(bad) = log_losses.iter().find(|l| !l.is_finite()) {
                    return Err(ModelError::Input(format!(
                        "group_relative weights: held-out log loss {bad} is not finite"
                    )));
                }
                let mean = log_losses.iter().sum::<f64>() / n as f64;
                let advantage: Vec<f64> = log_losses.iter().map(|l| (mean - l) / tau).collect();
                // Shifted by the largest advantage: no overflow.
                let top = advantage.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = advantage.iter().map(|a| (a - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                Ok(e.into_iter().map(|v| v / sum).collect())
            }
        }
    }
}

/// One adapter folder read whole: its config (as JSON) and its tensors.
struct FoldAdapter {
    dir: PathBuf,
    config: serde_json::Value,
    tensors: BTreeMap<String, Tensor>,
}

fn read_adapter(dir: &Path) -> Result<FoldAdapter> {
    // Parsed as LoRA first, so that a folder that is no PEFT LoRA adapter fails clearly.
    crate::checkpoint::open_adapter(dir)?;
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::file(&path, e.to_string()))?;
    let weights = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| ModelError::file(&weights, e.to_string()))?;
    Ok(FoldAdapter {
        dir: dir.to_path_buf(),
        config,
        tensors: tensors.into_iter().collect(),
    })
}

/// The first field where two adapter configs differ, as "key: a vs b".
fn config_difference(a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return (a != b).then(|| format!("{a} vs {b}"));
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    keys.into_iter().find_map(|k| {
        let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
        (x != y).then(|| format!("{k}: {x} vs {y}"))
    })
}

/// Every adapter read whole, checked to share one config and one set of tensor shapes.
fn read_checked(adapters: &[PathBuf]) -> Result<Vec<FoldAdapter>> {
    if adapters.len() < 2 {
        return Err(ModelError::Input(format!(
            "averaging needs at least 2 adapters, got {}",
            adapters.len()
        )));
    }
    let folds: Vec<FoldAdapter> = adapters
        .iter()
        .map(|d| read_adapter(d))
        .collect::<Result<_>>()?;
    let first = &folds[0];
    for other in &folds[1..] {
        if let Some(difference) = config_difference(&first.config, &other.config) {
            return Err(ModelError::Input(format!(
                "adapters {} and {} have different configs ({difference}); only adapters of one configuration can be averaged",
                first.dir.display(),
                other.dir.display()
            )));
        }
        let names = |f: &FoldAdapter| f.tensors.keys().cloned().collect::<Vec<_>>();
        if names(first) != names(other) {
            let missing = first
                .tensors
                .keys()
                .find(|k| !other.tensors.contains_key(*k))
                .or_else(|| {
                    other
                        .tensors
                        .keys()
                        .find(|k| !first.tensors.contains_key(*k))
                });
            return Err(ModelError::Input(format!(
                "adapters {} and {} hold different tensors (e.g. {}): only one adapter's folds can be averaged",
                first.dir.display(),
                other.dir.display(),
                missing.map_or("?", |s| s.as_str())
            )));
        }
        for (name, t) in &first.tensors {
            let u = &other.tensors[name];
            if t.dims() != u.dims() {
                return Err(ModelError::Input(format!(
                    "tensor {name} is {:?} in {} but {:?} in {}",
                    t.dims(),
                    first.dir.display(),
                    u.dims(),
                    other.dir.display()
                )));
            }
        }
    }
    Ok(folds)
}

/// Mode `delta`: the exact weighted mean of the folds' merged models, base + Σ_f w_f ·
/// scaling · B_f A_f per adapted projection (and the mean score head), written as a
/// merged Hugging Face `*ForSequenceClassification` folder at `output` in `dtype`.
pub fn average_merged(
    base: &str,
    adapters: &[PathBuf],
    weights: &FoldWeights,
    dtype: DType,
    output: &Path,
) -> Result<Vec<f64>> {
    let folds = read_checked(adapters)?;
    let w = weights.weights(adapters.len())?;
    let model = crate::checkpoint::load_classifier(base, Some(&adapters[0]), dtype, &Device::Cpu)?;
    let weighted: Vec<(f64, &BTreeMap<String, Tensor>)> = w
        .iter()
        .copied()
        .zip(folds.iter().map(|f| &f.tensors))
        .collect();
    let tensors = model.merged_mean_tensors(&weighted)?;
    crate::checkpoint::save_merged_tensors(&model, tensors, output)?;
    Ok(w)
}

/// The weighted mean of `adapters` (mode `mean`), written as a PEFT folder at `output`
/// (whole or not at all; an existing folder is not overwritten). Returns the weights used.
pub fn average_adapters(
    adapters: &[PathBuf],
    weights: &FoldWeights,
    output: &Path,
) -> Result<Vec<f64>> {
    let folds = read_checked(adapters)?;
    let w = weights.weights(adapters.len())?;
    let first = &folds[0];
    let mut averaged = Vec::with_capacity(first.tensors.len());
    for (name, t) in &first.tensors {
        let dtype = t.dtype();
        let mut sum = (t.to_dtype(DType::F64)? * w[0])?;
        for (fold, weight) in folds[1..].iter().zip(&w[1..]) {
            sum = (sum + (fold.tensors[name].to_dtype(DType::F64)? * *weight)?)?;
        }
        averaged.push((name.clone(), sum.to_dtype(dtype)?));
    }
    let config = first.config.clone();
    write_folder(output, |tmp| {
        write_safetensors(&tmp.join("adapter_model.safetensors"), &averaged)?;
        write_json(&tmp.join("adapter_config.json"), &config)
    })?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_relative_weights_by_hand() {
        // Losses 1.0, 1.1, 1.2: advantages 0.1, 0, -0.1; tau 0.1 -> e^1, e^0, e^-1.
        let w = FoldWeights::GroupRelative {
            log_losses: vec![1.0, 1.1, 1.2],
            tau: 0.1,
        }
        .weights(3)
        .unwrap();
        let e = [1f64.exp(), 1.0, (-1f64).exp()];
        let sum: f64 = e.iter().sum();
        for (got, want) in w.iter().zip(e) {
            assert!((got - want / sum).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(FoldWeights::Uniform.weights(4).unwrap(), vec![0.25; 4]);
        assert!(FoldWeights::GroupRelative {
            log_losses: vec![1.0],
            tau: 0.1
        }
        .weights(2)
        .is_err());
    }
}
