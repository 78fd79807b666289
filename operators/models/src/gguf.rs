//! GGUF checkpoints of the llama and qwen2 architectures: the config from the metadata and
//! the tensors dequantised to f32 under their Hugging Face names. llama.cpp permutes the
//! rows of Llama's query and key projections (for its interleaved RoPE); that is undone.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::error::{ModelError, Result};
use crate::models::ModelConfig;
use crate::weights::TensorSource;

/// Reads the header of a GGUF file.
pub fn read_content(path: &Path) -> Result<(Content, std::fs::File)> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| ModelError::file(path, format!("not a readable GGUF file: {e}")))?;
    Ok((content, file))
}

fn meta<'a>(content: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::file(path, format!("GGUF metadata has no `{key}`")))
}

fn meta_usize(content: &Content, path: &Path, key: &str) -> Result<usize> {
    let v = meta(content, path, key)?;
    v.to_u64()
        .map(|n| n as usize)
        .or_else(|_| v.to_u32().map(|n| n as usize))
        .or_else(|_| v.to_i32().map(|n| n as usize))
        .map_err(|e| ModelError::file(path, format!("`{key}`: {e}")))
}

fn meta_f64(content: &Content, path: &Path, key: &str) -> Result<f64> {
    let v = meta(content, path, key)?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|e| ModelError::file(path, format!("`{key}`: {e}")))
}

/// The config and the dequantised tensors of a GGUF file, named as a Hugging Face
/// `*ForCausalLM` checkpoint would name them.
pub fn load(path: &Path) -> Result<(ModelConfig, TensorSource)> {
    let (content, mut file) = read_content(path)?;
    let arch = meta(&content, path, "general.architecture")?
        .to_string()
        .map_err(|e| ModelError::file(path, e.to_string()))?
        .clone();
    let (model_type, architecture) = match arch.as_str() {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        other => {
            return Err(ModelError::file(
                path,
                format!("GGUF architecture `{other}` is not supported (llama and qwen2 are)"),
            ))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta_usize(&content, path, &key("embedding_length"))?;
    let heads = meta_usize(&content, path, &key("attention.head_count"))?;
    let kv_heads = meta_usize(&content, path, &key("attention.head_count_kv")).unwrap_or(heads);
    let head_dim =
        meta_usize(&content, path, &key("attention.key_length")).unwrap_or(hidden / heads);
    let layers = meta_usize(&content, path, &key("block_count"))?;
    let vocab = match meta_usize(&content, path, &key("vocab_size")) {
        Ok(v) => v,
        Err(_) => meta(&content, path, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| ModelError::file(path, e.to_string()))?
            .len(),
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::file(
            path,
            "carries `rope_freqs.weight` (Llama-3.1 rope scaling in llama.cpp's form), which is \
             not supported; load the Hugging Face checkpoint instead",
        ));
    }
    let pad = content
        .metadata
        .get("tokenizer.ggml.padding_token_id")
        .and_then(|v| v.to_u32().ok());
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = json!({
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_usize(&content, path, &key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta_f64(&content, path, &key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": meta_f64(&content, path, &key("rope.freq_base")).unwrap_or(10_000.0),
        "max_position_embeddings": meta_usize(&content, path, &key("context_length")).unwrap_or(4096),
        "pad_token_id": pad,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    });
    let config =
        ModelConfig::from_json(config).map_err(|e| ModelError::file(path, e.to_string()))?;

    let mut tensors = HashMap::new();
    let mut unknown = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf_name) = hf_name(name) else {
            unknown.push(name.clone());
            continue;
        };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| ModelError::file(path, format!("tensor {name}: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if arch == "llama" {
            if hf_name.ends_with("q_proj.weight") {
                t = unpermute(&t, heads)?;
            } else if hf_name.ends_with("k_proj.weight") {
                t = unpermute(&t, kv_heads)?;
            }
        }
        tensors.insert(hf_name, t);
    }
    if !unknown.is_empty() {
        return Err(ModelError::TensorMismatch {
            source_name: path.display().to_string(),
            missing: Vec::new(),
            unexpected: unknown,
        });
    }
    Ok((
        config,
        TensorSource::Memory {
            label: path.display().to_string(),
            tensors,
        },
    ))
}

/// The Hugging Face name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    if kind != "weight" && kind != "bias" {
        return None;
    }
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// Inverse of llama.cpp's `permute`: rows (head, pair, half) back to (head, half, pair).
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    /// llama.cpp's permute, written as convert_hf_to_gguf.py writes it, inverted.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, hd, inp) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (heads * hd * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, inp))
            .unwrap();
        let permuted = hf
            .reshape((heads, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, inp))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
