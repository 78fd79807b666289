//! Opening checkpoints (a Hugging Face model folder, a hub id, a GGUF file), PEFT adapter
//! folders, and saving adapters and merged models in the formats transformers and PEFT load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::lora::LoraConfig;
use crate::models::{ModelConfig, SequenceClassifier};
use crate::weights::{safetensors_files, TensorSource};

/// A model's config and tensors, and where they came from.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub tensors: TensorSource,
    pub location: String,
}

/// A PEFT LoRA adapter folder.
pub struct Adapter {
    pub config: LoraConfig,
    pub tensors: TensorSource,
    pub dir: PathBuf,
}

/// Opens `spec`: a folder with `config.json`, a `.gguf` file, or a hub id `org/name` (with
/// an optional `@revision`).
pub fn open_model(spec: &str) -> Result<Checkpoint> {
    let path = Path::new(spec);
    if path.is_dir() {
        return open_folder(path);
    }
    if path.is_file() && spec.ends_with(".gguf") {
        let (config, tensors) = crate::gguf::load(path)?;
        return Ok(Checkpoint {
            config,
            tensors,
            location: spec.to_string(),
        });
    }
    if looks_like_hub_id(spec) && !path.exists() {
        let dir = crate::hub::fetch_model(spec)?;
        return open_folder(&dir);
    }
    Err(ModelError::file(
        path,
        "not a model folder (with config.json), a .gguf file, or a hub id like org/name",
    ))
}

/// Every file that loading `spec` reads, so that their contents key what the model
/// computes: a folder's `config.json`, safetensors index and weight shards (and its
/// `tokenizer_config.json` where it has one); a GGUF file; for a hub id, the same files of
/// the snapshot it resolves to (downloading what the cache lacks), whose folder names the
/// resolved revision.
pub fn model_files(spec: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    } else if looks_like_hub_id(spec) {
        crate::hub::fetch_model(spec)?
    } else {
        return Err(ModelError::file(
            path,
            "not a model folder (with config.json), a .gguf file, or a hub id like org/name",
        ));
    };
    let mut files = vec![dir.join("config.json")];
    for name in ["model.safetensors.index.json", "tokenizer_config.json"] {
        if dir.join(name).is_file() {
            files.push(dir.join(name));
        }
    }
    files.extend(safetensors_files(&dir, "model")?);
    Ok(files)
}

fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or(spec);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && *p != "."
                && *p != ".."
        })
}

/// A Hugging Face model folder: `config.json` and `model.safetensors` or its shards.
pub fn open_folder(dir: &Path) -> Result<Checkpoint> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let files = safetensors_files(dir, "model")?;
    let tensors = TensorSource::safetensors(dir.display().to_string(), &files)?;
    Ok(Checkpoint {
        config,
        tensors,
        location: dir.display().to_string(),
    })
}

/// A PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors`.
pub fn open_adapter(dir: &Path) -> Result<Adapter> {
    let config = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (there is an adapter_model.bin: save it again with safe_serialization=True)"
        } else {
            ""
        };
        return Err(ModelError::file(&weights, format!("no such file{hint}")));
    }
    let tensors = TensorSource::safetensors(weights.display().to_string(), &[weights])?;
    Ok(Adapter {
        config,
        tensors,
        dir: dir.to_path_buf(),
    })
}

/// Loads a classifier from a model spec and an optional adapter folder.
pub fn load_classifier(
    model: &str,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<SequenceClassifier> {
    let checkpoint = open_model(model)?;
    let adapter = adapter.map(open_adapter).transpose()?;
    SequenceClassifier::load(
        &checkpoint.config,
        &checkpoint.tensors,
        adapter.as_ref().map(|a| (&a.config, &a.tensors)),
        dtype,
        device,
    )
}

/// Writes a folder whole or not at all: into a sibling `.partial` folder, renamed into place.
/// An existing folder is never overwritten.
pub(crate) fn write_folder(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.exists() {
        return Err(ModelError::file(
            dir,
            "already exists; refusing to overwrite it",
        ));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| ModelError::file(dir, "not a folder name"))?
        .to_string_lossy()
        .to_string();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let partial = parent.join(format!(".{name}.{}.partial", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| ModelError::io(&partial, e))?;
    match write(&partial) {
        Ok(()) => std::fs::rename(&partial, dir).map_err(|e| ModelError::io(dir, e)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::file(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// Writes tensors as safetensors with the `{"format": "pt"}` metadata transformers expects.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut prepared = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        prepared.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        prepared.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| ModelError::file(path, e.to_string()))
}

/// Saves the model's adapters (and trained score head) as a PEFT folder:
/// `adapter_config.json` and `adapter_model.safetensors` with PEFT's tensor names.
pub fn save_adapter(model: &SequenceClassifier, dir: &Path) -> Result<()> {
    let lora = model
        .lora
        .as_ref()
        .ok_or_else(|| ModelError::Input("the model has no LoRA adapter to save".into()))?;
    let tensors: Vec<(String, Tensor)> = model
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    let mut config = serde_json::to_value(lora).map_err(|e| ModelError::Config(e.to_string()))?;
    config["task_type"] = "SEQ_CLS".into();
    write_folder(dir, |tmp| {
        write_safetensors(&tmp.join("adapter_model.safetensors"), &tensors)?;
        write_json(&tmp.join("adapter_config.json"), &config)
    })
}

/// The names transformers gives the three labels.
pub const LABELS: [&str; 3] = ["winner_model_a", "winner_model_b", "winner_tie"];

/// Saves the model with its adapters folded in as a Hugging Face
/// `*ForSequenceClassification` folder (`config.json`, `model.safetensors`).
pub fn save_merged(model: &SequenceClassifier, dir: &Path) -> Result<()> {
    save_merged_tensors(model, model.merged_tensors()?, dir)
}

/// Saves `tensors` (a merged checkpoint's, e.g. [`SequenceClassifier::merged_mean_tensors`])
/// with `model`'s config as a Hugging Face `*ForSequenceClassification` folder.
pub fn save_merged_tensors(
    model: &SequenceClassifier,
    tensors: std::collections::BTreeMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    save_checkpoint(model, tensors, None, dir)
}

/// Saves a GPTQ checkpoint: `model`'s tensors with each quantized projection's `weight`
/// replaced by its `qweight`, `qzeros`, `scales` and `g_idx` (`quantized`, keyed by the
/// projection's path, `model.layers.0.self_attn.q_proj`), and `settings` as config.json's
/// `quantization_config`.
pub fn save_gptq(
    model: &SequenceClassifier,
    quantized: &std::collections::BTreeMap<String, crate::gptq::QuantizedLinear>,
    settings: &crate::gptq::GptqSettings,
    dir: &Path,
) -> Result<()> {
    let mut tensors = model.merged_tensors()?;
    for (path, q) in quantized {
        if tensors.remove(&format!("{path}.weight")).is_none() {
            return Err(ModelError::Input(format!(
                "gptq: the model has no projection {path}"
            )));
        }
        let packed = crate::gptq::GptqTensors::pack(q)
            .map_err(|e| ModelError::Input(format!("{path}: {e}")))?;
        tensors.extend(packed.to_tensors(path)?);
    }
    save_checkpoint(model, tensors, Some(settings.to_config()), dir)
}

fn save_checkpoint(
    model: &SequenceClassifier,
    tensors: std::collections::BTreeMap<String, Tensor>,
    quantization: Option<serde_json::Value>,
    dir: &Path,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let mut config = model.raw_config.clone();
    let arch = match model.config.family {
        crate::models::Family::Llama => "LlamaForSequenceClassification",
        crate::models::Family::Qwen2 => "Qwen2ForSequenceClassification",
        crate::models::Family::Gemma2 => "Gemma2ForSequenceClassification",
    };
    config["architectures"] = serde_json::json!([arch]);
    // Merged weights are dense, even from a GPTQ base (dequantized, then merged).
    match quantization {
        Some(q) => config["quantization_config"] = q,
        None => {
            if let Some(fields) = config.as_object_mut() {
                fields.remove("quantization_config");
            }
        }
    }
    config["id2label"] = serde_json::json!({"0": LABELS[0], "1": LABELS[1], "2": LABELS[2]});
    config["label2id"] = serde_json::json!({LABELS[0]: 0, LABELS[1]: 1, LABELS[2]: 2});
    let dtype = match model.dtype() {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    };
    config["torch_dtype"] = dtype.into();
    if config.get("dtype").is_some() {
        config["dtype"] = dtype.into();
    }
    write_folder(dir, |tmp| {
        write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
        write_json(&tmp.join("config.json"), &config)
    })
}

/// Parses `f32`, `bf16`, `f16` (and `f64`, for gradient checks).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(ModelError::Input(format!(
            "dtype `{other}` is not one of f32, bf16, f16"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_hub_id;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("google/gemma-2-9b"));
        assert!(looks_like_hub_id("meta-llama/Llama-3.1-8B@main"));
        assert!(!looks_like_hub_id("models/tiny/llama"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("plain"));
    }
}
