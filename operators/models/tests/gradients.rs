//! Training keeps the LoRA weights and the score head as variables over a frozen base: their
//! gradients from candle's autograd must match central finite differences (f64, tiny models).

use std::path::PathBuf;

use arenaflow_models::lora::LoraConfig;
use arenaflow_models::models::PaddingSide;
use arenaflow_models::models::{ModelConfig, PaddedBatch, SequenceClassifier};
use arenaflow_models::weights::{SplitMix64, TensorSource};
use candle_core::{DType, Device, Tensor};

fn config(family: &str) -> ModelConfig {
    ModelConfig::from_file(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(family)
            .join("base/config.json"),
    )
    .unwrap()
}

fn loss(model: &SequenceClassifier, batch: &PaddedBatch, labels: &Tensor) -> Tensor {
    let logits = model.forward_t(batch, true).unwrap();
    candle_nn::loss::cross_entropy(&logits, labels).unwrap()
}

fn check_family(family: &str) {
    let cfg = config(family);
    let source = TensorSource::Random { seed: 11, std: 0.2 };
    let mut model =
        SequenceClassifier::load(&cfg, &source, None, DType::F64, &Device::Cpu).unwrap();
    let mut lora = LoraConfig::all_linear(3, 6.0, 0.0);
    lora.layers_to_transform = Some(arenaflow_models::lora::LayerSelection::Many(vec![0, 2]));
    model.init_lora(&lora, 5).unwrap();
    // PEFT starts B at zero; give it values so that gradients reach A too.
    let mut rng = SplitMix64::new(3);
    for (name, var) in model.trainable_vars() {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let values: Vec<f64> = (0..n).map(|_| 0.3 * rng.next_normal()).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let rows: Vec<Vec<u32>> = vec![
        vec![5, 9, 14, 3, 77, 21, 8],
        vec![31, 2, 60],
        vec![12, 40, 7, 19, 88],
    ];
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch = PaddedBatch::pad(&refs, 0, PaddingSide::Right).unwrap();
    let labels = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();

    let vars = model.trainable_vars();
    assert_eq!(
        vars.len(),
        2 * 7 * 2 + 1,
        "A and B on 7 projections of 2 layers, and the head"
    );
    let grads = loss(&model, &batch, &labels).backward().unwrap();
    let mut checked = 0;
    let mut worst = 0f64;
    for (name, var) in &vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // A few entries of each variable.
        for k in 0..3 {
            let j = (k * 7919 + name.len()) % original.len();
            let h = 1e-5;
            let at = |delta: f64| {
                let mut values = original.clone();
                values[j] += delta;
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model, &batch, &labels).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (numeric - grad[j]).abs() / (numeric.abs().max(grad[j].abs()).max(1e-6));
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "{family} {name}[{j}]: autograd {} vs finite difference {numeric}",
                grad[j]
            );
            checked += 1;
        }
    }
    eprintln!("{family}: {checked} gradient entries, worst relative error {worst:.2e}");
}

#[test]
fn llama_lora_gradients_match_finite_differences() {
    check_family("llama");
}

#[test]
fn gemma2_lora_gradients_match_finite_differences() {
    check_family("gemma2");
}

#[test]
fn qwen2_lora_gradients_match_finite_differences() {
    check_family("qwen2");
}
