//! LoRA fold averaging on the fixture adapter: the `mean` of an adapter and its double is
//! 1.5 times it, tensor by tensor; the result loads as an adapter; different configs or
//! tensor sets fail naming the difference, and nothing is written.

mod common;

use std::path::{Path, PathBuf};

use common::fixture_logits;

use arenaflow_models::average::{average_adapters, average_merged, FoldWeights};
use arenaflow_models::checkpoint::{load_classifier, write_safetensors};
use candle_core::{DType, Device, Tensor};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut t: Vec<(String, Tensor)> =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// max |a - b| over two tensors of one shape, in f64.
fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    (f64(a) - f64(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A copy of the fixture adapter with every tensor through `change` and the config
/// through `config`.
fn variant(
    dir: &Path,
    change: impl Fn(&Tensor) -> Tensor,
    config: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let source = fixture().join("adapter");
    let changed: Vec<(String, Tensor)> = tensors(&source)
        .into_iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, t)| (n, change(&t)))
        .collect();
    write_safetensors(&dir.join("adapter_model.safetensors"), &changed).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut json);
    std::fs::write(dir.join("adapter_config.json"), json.to_string()).unwrap();
    dir.to_path_buf()
}

/// The fixture adapter (`dir/fold0`) and the same with every tensor doubled (`dir/fold1`).
fn an_adapter_and_its_double(dir: &Path) -> (PathBuf, PathBuf) {
    let one = variant(&dir.join("fold0"), |t| t.clone(), |_| {}, |_| true);
    let two = variant(&dir.join("fold1"), |t| (t * 2.0).unwrap(), |_| {}, |_| true);
    (one, two)
}

#[test]
fn the_mean_of_an_adapter_and_its_double_is_one_and_a_half_times_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = an_adapter_and_its_double(tmp.path());
    let out = tmp.path().join("averaged");
    let w = average_adapters(&[one.clone(), two], &FoldWeights::Uniform, &out).unwrap();
    assert_eq!(w, vec![0.5, 0.5]);
    let original = tensors(&one);
    let averaged = tensors(&out);
    assert_eq!(original.len(), averaged.len());
    for ((n, a), (m, b)) in original.iter().zip(&averaged) {
        assert_eq!(n, m);
        let diff = max_difference(b, &(a * 1.5).unwrap());
        assert!(diff < 1e-6, "{n}: off by {diff}");
    }
    // It is an adapter of the base model like any other.
    let base = fixture().join("base");
    load_classifier(base.to_str().unwrap(), Some(&out), DType::F32, &Device::Cpu).unwrap();
    // An existing output is not overwritten.
    let again = average_adapters(&[one.clone(), one.clone()], &FoldWeights::Uniform, &out);
    assert!(again.unwrap_err().to_string().contains("already exists"));
}

#[test]
fn adapters_of_different_configs_or_tensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let one = variant(&tmp.path().join("fold0"), |t| t.clone(), |_| {}, |_| true);
    let alpha = variant(
        &tmp.path().join("alpha"),
        |t| t.clone(),
        |c| c["lora_alpha"] = 64.0.into(),
        |_| true,
    );
    let out = tmp.path().join("averaged");
    let e = average_adapters(&[one.clone(), alpha], &FoldWeights::Uniform, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different configs (lora_alpha:"), "{e}");
    assert!(!out.exists());
    let fewer = variant(
        &tmp.path().join("fewer"),
        |t| t.clone(),
        |_| {},
        |n| !n.contains("layers.0.self_attn.q_proj"),
    );
    let e = average_adapters(&[one.clone(), fewer], &FoldWeights::Uniform, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hold different tensors"), "{e}");
    assert!(e.contains("layers.0.self_attn.q_proj"), "{e}");
    assert!(!out.exists());
}

/// Mode `delta`: the merged mean of one adapter twice is that adapter merged (same logits
/// as base + adapter); of an adapter and its double (B·A four times over), the projections
/// are base + 2.5 scale·B·A, the mean of the two merged models, and the head 1.5 times.
#[test]
fn delta_is_the_mean_of_the_merged_models() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture().join("base").display().to_string();
    let (one, two) = an_adapter_and_its_double(tmp.path());

    let same = tmp.path().join("same");
    average_merged(
        &base,
        &[one.clone(), one.clone()],
        &FoldWeights::Uniform,
        DType::F32,
        &same,
    )
    .unwrap();
    let merged = load_classifier(same.to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap();
    let adapted = load_classifier(&base, Some(&one), DType::F32, &Device::Cpu).unwrap();
    for (a, b) in fixture_logits(&merged)
        .iter()
        .flatten()
        .zip(fixture_logits(&adapted).iter().flatten())
    {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    let mixed = tmp.path().join("mixed");
    average_merged(
        &base,
        &[one.clone(), two.clone()],
        &FoldWeights::Uniform,
        DType::F32,
        &mixed,
    )
    .unwrap();
    let m0 = load_classifier(&base, Some(&one), DType::F32, &Device::Cpu)
        .unwrap()
        .merged_tensors()
        .unwrap();
    let m2 = load_classifier(&base, Some(&two), DType::F32, &Device::Cpu)
        .unwrap()
        .merged_tensors()
        .unwrap();
    let got: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(mixed.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut projections = 0;
    for (name, a) in &m0 {
        let diff = max_difference(&got[name], &((a + &m2[name]).unwrap() * 0.5).unwrap());
        assert!(diff < 1e-5, "{name}: off by {diff}");
        projections += usize::from(name.contains("_proj"));
    }
    assert!(projections > 0);
}
