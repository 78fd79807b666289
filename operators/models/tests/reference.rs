//! The three families against transformers + PEFT: logits of the committed tiny checkpoints
//! (made by tests/fixtures/models/make_fixtures.py) on left- and right-padded batches, with
//! and without the adapter, and after saving and loading the adapter and the merged model.

use std::path::PathBuf;

use arenaflow_models::checkpoint::{
    load_classifier, open_adapter, open_folder, save_adapter, save_merged,
};
use arenaflow_models::models::PaddingSide;
use arenaflow_models::models::{PaddedBatch, SequenceClassifier};
use arenaflow_models::weights::TensorSource;
use arenaflow_models::ModelError;
use candle_core::{DType, Device};

const FAMILIES: [&str; 3] = ["llama", "qwen2", "gemma2"];

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(family)
}

struct Reference {
    rows: Vec<Vec<u32>>,
    pad: u32,
    json: serde_json::Value,
}

fn reference(family: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(family).join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    Reference {
        rows,
        pad: json["pad_token_id"].as_u64().unwrap() as u32,
        json,
    }
}

fn logits(model: &SequenceClassifier, r: &Reference, side: PaddingSide) -> Vec<Vec<f32>> {
    let rows: Vec<&[u32]> = r.rows.iter().map(|r| r.as_slice()).collect();
    let batch = PaddedBatch::pad(&rows, r.pad, side).unwrap();
    model
        .forward_t(&batch, false)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(got: &[Vec<f32>], want: &serde_json::Value) -> f32 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        let w = w.as_array().unwrap();
        assert_eq!(g.len(), 3);
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    worst
}

fn assert_matches(model: &SequenceClassifier, r: &Reference, key: &str, what: &str) {
    for (side, name) in [(PaddingSide::Right, "right"), (PaddingSide::Left, "left")] {
        let diff = max_diff(&logits(model, r, side), &r.json[key][name]);
        eprintln!("{what}, {name} padding: max |diff| = {diff:.3e}");
        assert!(diff <= 1e-4, "{what}, {name} padding: max |diff| = {diff}");
    }
}

fn base(family: &str) -> String {
    fixture(family).join("base").display().to_string()
}

#[test]
fn base_models_match_transformers() {
    for family in FAMILIES {
        let r = reference(family);
        let model = load_classifier(&base(family), None, DType::F32, &Device::Cpu).unwrap();
        assert_matches(&model, &r, "base", &format!("{family} base"));
    }
}

#[test]
fn adapters_match_peft() {
    for family in FAMILIES {
        let r = reference(family);
        let adapter = fixture(family).join("adapter");
        let model =
            load_classifier(&base(family), Some(&adapter), DType::F32, &Device::Cpu).unwrap();
        assert_matches(&model, &r, "adapter", &format!("{family} + adapter"));
    }
}

#[test]
fn saved_adapter_and_merged_model_load_back() {
    for family in FAMILIES {
        let r = reference(family);
        let tmp = tempfile::tempdir().unwrap();
        let model = load_classifier(
            &base(family),
            Some(&fixture(family).join("adapter")),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();

        let saved = tmp.path().join("adapter");
        save_adapter(&model, &saved).unwrap();
        let again = load_classifier(&base(family), Some(&saved), DType::F32, &Device::Cpu).unwrap();
        assert_matches(&again, &r, "adapter", &format!("{family} saved adapter"));
        // Saving never overwrites.
        assert!(save_adapter(&model, &saved).is_err());

        let merged = tmp.path().join("merged");
        save_merged(&model, &merged).unwrap();
        let merged_model = load_classifier(
            &merged.display().to_string(),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert!(merged_model.lora.is_none());
        assert_matches(&merged_model, &r, "adapter", &format!("{family} merged"));
    }
}

/// Adapters folded in at load for inference (`merge_adapters`, PEFT's merge_and_unload)
/// give PEFT's logits of the unmerged model, and leave no adapter behind.
#[test]
fn adapters_merged_in_memory_match_peft() {
    for family in FAMILIES {
        let r = reference(family);
        let mut model = load_classifier(
            &base(family),
            Some(&fixture(family).join("adapter")),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        model.merge_adapters().unwrap();
        assert!(model
            .trainable_vars()
            .iter()
            .all(|(name, _)| !name.contains("lora")));
        let tmp = tempfile::tempdir().unwrap();
        let refused = save_adapter(&model, &tmp.path().join("adapter")).unwrap_err();
        assert!(
            refused.to_string().contains("no LoRA adapter to save"),
            "{refused}"
        );
        assert!(!tmp.path().join("adapter").exists());
        assert_matches(&model, &r, "adapter", &format!("{family} merged in memory"));
    }
}

/// bf16 and f16 weights and activations: the error against the f32 reference stays within a
/// small multiple of transformers' own bf16 error on the same checkpoint.
#[test]
fn bf16_error_is_no_worse_than_transformers() {
    for (family, dtype) in FAMILIES
        .iter()
        .flat_map(|f| [(*f, DType::BF16), (*f, DType::F16)])
    {
        let r = reference(family);
        let model = load_classifier(&base(family), None, dtype, &Device::Cpu).unwrap();
        let ours = max_diff(
            &logits(&model, &r, PaddingSide::Right),
            &r.json["base"]["right"],
        );
        let torch_bf16: Vec<Vec<f32>> = r.json["base_bf16"]["right"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let theirs = max_diff(&torch_bf16, &r.json["base"]["right"]);
        eprintln!(
            "{family} {dtype:?} vs f32 reference: arenaflow {ours:.3e}, transformers bf16 {theirs:.3e}"
        );
        assert!(
            ours <= 3.0 * theirs.max(1e-2),
            "{family} {dtype:?}: error {ours} vs transformers' bf16 {theirs}"
        );
    }
}

/// Loading is all or nothing: a missing tensor and an extra one are both named.
#[test]
fn missing_and_unexpected_tensors_are_errors() {
    let checkpoint = open_folder(&fixture("llama").join("base")).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in checkpoint.tensors.names().unwrap() {
        if name == "model.layers.1.mlp.up_proj.weight" {
            continue;
        }
        let TensorSource::Safetensors { files, .. } = &checkpoint.tensors else {
            unreachable!()
        };
        tensors.insert(name.clone(), files.load(&name, &Device::Cpu).unwrap());
    }
    tensors.insert(
        "lm_head.weight".into(),
        candle_core::Tensor::zeros((97, 48), DType::F32, &Device::Cpu).unwrap(),
    );
    let source = TensorSource::Memory {
        label: "edited".into(),
        tensors,
    };
    let err = SequenceClassifier::load(&checkpoint.config, &source, None, DType::F32, &Device::Cpu)
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ModelError::TensorMismatch { .. }), "{text}");
    assert!(text.contains("model.layers.1.mlp.up_proj.weight"), "{text}");
    assert!(
        text.contains("unexpected tensor(s): lm_head.weight"),
        "{text}"
    );

    // An adapter whose tensors do not cover its target modules.
    let adapter = open_adapter(&fixture("qwen2").join("adapter")).unwrap();
    let mut config = adapter.config.clone();
    config.layers_to_transform = None;
    let qwen = open_folder(&fixture("qwen2").join("base")).unwrap();
    let err = SequenceClassifier::load(
        &qwen.config,
        &qwen.tensors,
        Some((&config, &adapter.tensors)),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"),
        "{err}"
    );
}

/// Writes each family's adapter and merged model as arenaflow saves them, for
/// `make_fixtures.py check` to load with transformers + PEFT (run by hand:
/// `ARENAFLOW_EXPORT_DIR=DIR cargo test --workspace --test reference -- --ignored`).
#[test]
#[ignore = "writes files for the Python check; run by hand"]
fn export_for_transformers() {
    let out = PathBuf::from(std::env::var("ARENAFLOW_EXPORT_DIR").expect("ARENAFLOW_EXPORT_DIR"));
    for family in FAMILIES {
        let model = load_classifier(
            &base(family),
            Some(&fixture(family).join("adapter")),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        save_adapter(&model, &out.join(family).join("adapter")).unwrap();
        save_merged(&model, &out.join(family).join("merged")).unwrap();
    }
}

/// A checkpoint split into shards with `model.safetensors.index.json` loads as the single
/// file does; an index naming a shard that is not there is an error naming it.
#[test]
fn sharded_checkpoints_load() {
    let r = reference("llama");
    let checkpoint = open_folder(&fixture("llama").join("base")).unwrap();
    let TensorSource::Safetensors { files, .. } = &checkpoint.tensors else {
        unreachable!()
    };
    let names: Vec<String> = checkpoint.tensors.names().unwrap().into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let mut weight_map = serde_json::Map::new();
    for (part, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", part + 1);
        let tensors: Vec<(String, candle_core::Tensor)> = chunk
            .iter()
            .map(|n| (n.clone(), files.load(n, &Device::Cpu).unwrap()))
            .collect();
        arenaflow_models::checkpoint::write_safetensors(&dir.path().join(&file), &tensors).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    std::fs::copy(
        fixture("llama").join("base/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let model =
        load_classifier(dir.path().to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap();
    assert_matches(&model, &r, "base", "llama sharded");

    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_classifier(dir.path().to_str().unwrap(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

/// Gemma-2 in f16 with its activations outgrowing f16 (tests/fixtures/models/make_fixtures.py
/// f16_overflow: three channels of layer 1's post-feedforward norm weight at 30,000, the
/// residual stream reaching 69,064 in f32): transformers' f16 logits are NaN for the row
/// that overflows; arenaflow's saturate at 65,504 and stay near the f32 ones.
#[test]
fn f16_gemma2_saturates_where_its_activations_outgrow_f16() {
    let text = std::fs::read_to_string(fixture("gemma2").join("f16_overflow.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(!json["transformers_f16_finite"].as_bool().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("gemma2").join("base");
    std::fs::copy(base.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = format!(
        "model.layers.{}.post_feedforward_layernorm.weight",
        json["layer"]
    );
    let mut weight = tensors[&name].to_vec1::<f32>().unwrap();
    for c in json["channels"].as_array().unwrap() {
        weight[c.as_u64().unwrap() as usize] = json["weight"].as_f64().unwrap() as f32;
    }
    let len = weight.len();
    tensors.insert(
        name,
        candle_core::Tensor::from_vec(weight, len, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let r = Reference {
        rows: serde_json::from_value(json["rows"].clone()).unwrap(),
        pad: json["pad_token_id"].as_u64().unwrap() as u32,
        json: json.clone(),
    };
    let model_dir = dir.path().to_str().unwrap();
    let f32_model = load_classifier(model_dir, None, DType::F32, &Device::Cpu).unwrap();
    let f32_error = max_diff(
        &logits(&f32_model, &r, PaddingSide::Right),
        &json["logits_f32"],
    );
    assert!(f32_error < 1e-4, "f32 against transformers: {f32_error}");
    let f16_model = load_classifier(model_dir, None, DType::F16, &Device::Cpu).unwrap();
    let f16 = logits(&f16_model, &r, PaddingSide::Right);
    assert!(
        f16.iter().flatten().all(|v| v.is_finite()),
        "f16 logits not finite: {f16:?}"
    );
    let f16_error = max_diff(&f16, &json["logits_f32"]);
    eprintln!(
        "gemma2 overflowing f16: arenaflow f32 {f32_error:.2e} off transformers' f32, f16 {f16_error:.3} off it (transformers' f16: NaN)"
    );
    assert!(f16_error < 0.1, "f16 against f32: {f16_error}");
}
