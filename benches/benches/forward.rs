//! CPU forward pass of each family at a small size (hidden 512, 4 layers, 8 heads, 2 KV
//! heads, intermediate 1,376, vocab 32,000; Gemma-2 with head_dim 64, a 128-token sliding
//! window and the 50.0 soft-cap), random weights, f32, a batch of 4 x 256 tokens: tokens/s.

use arenaflow_models::models::PaddingSide;
use arenaflow_models::models::{ModelConfig, PaddedBatch, SequenceClassifier};
use arenaflow_models::weights::{SplitMix64, TensorSource};
use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

const ROWS: usize = 4;
const LENGTH: usize = 256;

fn config(family: &str) -> ModelConfig {
    let mut c = json!({
        "model_type": family,
        "architectures": ["ForSequenceClassification"],
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "pad_token_id": 0,
        "id2label": {"0": "a", "1": "b", "2": "tie"},
    });
    c["architectures"] = json!([format!(
        "{}ForSequenceClassification",
        match family {
            "llama" => "Llama",
            "qwen2" => "Qwen2",
            _ => "Gemma2",
        }
    )]);
    if family == "gemma2" {
        c["head_dim"] = 64.into();
        c["query_pre_attn_scalar"] = 64.into();
        c["attn_logit_softcapping"] = 50.0.into();
        c["sliding_window"] = 128.into();
    }
    ModelConfig::from_json(c).expect("config")
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_cpu_f32");
    group.sample_size(10);
    group.throughput(Throughput::Elements((ROWS * LENGTH) as u64));
    let mut rng = SplitMix64::new(1);
    let rows: Vec<Vec<u32>> = (0..ROWS)
        .map(|_| {
            (0..LENGTH)
                .map(|_| 1 + (rng.next_u64() % 31_999) as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch = PaddedBatch::pad(&refs, 0, PaddingSide::Right).expect("batch");
    for family in ["llama", "qwen2", "gemma2"] {
        let source = TensorSource::Random { seed: 7, std: 0.02 };
        let model =
            SequenceClassifier::load(&config(family), &source, None, DType::F32, &Device::Cpu)
                .expect("model");
        group.bench_function(format!("{family}_4x256"), |b| {
            b.iter(|| model.forward_t(&batch, false).expect("forward"))
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
