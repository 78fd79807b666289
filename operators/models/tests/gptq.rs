//! GPTQ against an independent re-implementation of the reference (issue 16, point 4a):
//! `tests/fixtures/gptq/make_gptq_fixtures.py` (NumPy, by hand from IST-DASLab/gptq's
//! fasterquant; its `check_against_reference.py` gives the reference code's own values for
//! 100% of the weights) wrote a layer, its calibration inputs and, for 6 cases (8 and 4 bits;
//! groups of 128, 32 and whole rows; act-order; an asymmetric grid), the integer codes,
//! scales, zeros and g_idx, with each case's layer-output error and round-to-nearest's.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{fixture_logits, logits_of, max_abs_diff};

use arenaflow_models::gptq::{
    gptq, round_to_nearest, GptqConfig, GptqTensors, Hessian, QuantizedLinear,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gptq")
}

/// Every tensor of gptq.safetensors as f64, with its shape.
fn tensors() -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(fixtures().join("gptq.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I32 => data
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::U8 => data.iter().map(|&b| b as f64).collect(),
                other => panic!("{name}: dtype {other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// A tensor's values as f32, flattened.
fn f32s(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Σ (x Wqᵀ − x Wᵀ)² over the calibration inputs: the layer-output error.
fn output_error(x: &[f64], tokens: usize, w: &[f64], q: &[f64], out: usize, inp: usize) -> f64 {
    let mut total = 0.0;
    for t in 0..tokens {
        let row = &x[t * inp..(t + 1) * inp];
        for o in 0..out {
            let (wo, qo) = (&w[o * inp..(o + 1) * inp], &q[o * inp..(o + 1) * inp]);
            let d: f64 = row
                .iter()
                .zip(wo.iter().zip(qo))
                .map(|(a, (b, c))| a * (c - b))
                .sum();
            total += d * d;
        }
    }
    total
}

struct Fixture {
    meta: serde_json::Value,
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    weight: Vec<f32>,
    out: usize,
    inp: usize,
    hessian: Hessian,
}

fn fixture() -> Fixture {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gptq.json")).unwrap())
            .unwrap();
    let tensors = tensors();
    let (shape, w) = &tensors["weight"];
    let (out, inp) = (shape[0], shape[1]);
    let weight: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let (samples, tokens) = (
        meta["samples"].as_u64().unwrap() as usize,
        meta["tokens"].as_u64().unwrap() as usize,
    );
    let x: Vec<f32> = tensors["inputs"].1.iter().map(|&v| v as f32).collect();
    let mut hessian = Hessian::new(inp);
    for s in 0..samples {
        hessian
            .add_sample(&x[s * tokens * inp..(s + 1) * tokens * inp], tokens)
            .unwrap();
    }
    Fixture {
        meta,
        tensors,
        weight,
        out,
        inp,
        hessian,
    }
}

fn config(case: &serde_json::Value) -> GptqConfig {
    let group = case["group_size"].as_i64().unwrap();
    GptqConfig {
        bits: case["bits"].as_u64().unwrap() as u32,
        group_size: (group > 0).then_some(group as usize),
        act_order: case["act_order"].as_bool().unwrap(),
        sym: case["sym"].as_bool().unwrap(),
        ..GptqConfig::default()
    }
}

#[test]
fn gptq_gives_the_reference_codes_and_beats_round_to_nearest() {
    let f = fixture();
    let x = &f.tensors["inputs"].1;
    let tokens = x.len() / f.inp;
    let w: Vec<f64> = f.weight.iter().map(|&v| v as f64).collect();
    let cases = f.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 6);
    for (name, case) in cases {
        let cfg = config(case);
        let q: QuantizedLinear = gptq(name, &f.weight, f.out, &f.hessian, &cfg).unwrap();
        let expected = |field: &str| &f.tensors[&format!("{name}.{field}")].1;
        let codes = expected("codes");
        let same = q
            .codes
            .iter()
            .zip(codes)
            .filter(|(a, b)| **a as f64 == **b)
            .count() as f64
            / codes.len() as f64;
        let zeros_same = q
            .zeros
            .iter()
            .zip(expected("zeros"))
            .all(|(a, b)| *a as f64 == *b);
        let g_idx_same = q
            .g_idx
            .iter()
            .zip(expected("g_idx"))
            .all(|(a, b)| *a as f64 == *b);
        let scale_gap = q
            .scales
            .iter()
            .zip(expected("scales"))
            .map(|(a, b)| (a - b).abs() / b.abs())
            .fold(0.0, f64::max);
        let ours = output_error(x, tokens, &w, &q.dequantize(), f.out, f.inp);
        let theirs = case["output_error"].as_f64().unwrap();
        let rtn = round_to_nearest(name, &f.weight, f.out, f.inp, &cfg).unwrap();
        let rtn_error = output_error(x, tokens, &w, &rtn.dequantize(), f.out, f.inp);
        eprintln!(
            "{name}: codes the same for {:.4}% of weights; scales within {scale_gap:.1e}; output error {ours:.6} (reference {theirs:.6}, round-to-nearest {rtn_error:.6})",
            100.0 * same
        );
        assert!(
            same >= 0.999,
            "{name}: {:.4}% of codes the same",
            100.0 * same
        );
        assert!(zeros_same && g_idx_same, "{name}: zeros or g_idx differ");
        assert_eq!(q.scales.len(), expected("scales").len(), "{name}: groups");
        assert!(scale_gap < 1e-9, "{name}: scales off by {scale_gap:e}");
        assert!(
            (ours - theirs).abs() <= 0.01 * theirs,
            "{name}: output error {ours} against the reference's {theirs}"
        );
        let rtn_reference = case["rtn_output_error"].as_f64().unwrap();
        assert!(
            (rtn_error - rtn_reference).abs() <= 1e-6 * rtn_reference,
            "{name}: round-to-nearest's output error {rtn_error} against {rtn_reference}"
        );
        assert!(
            ours < rtn_error,
            "{name}: GPTQ {ours} not below round-to-nearest {rtn_error}"
        );
    }
}

#[test]
fn bad_settings_fail_naming_the_layer() {
    let f = fixture();
    let cfg = GptqConfig {
        group_size: Some(100),
        ..GptqConfig::default()
    };
    let err = gptq(
        "model.layers.0.mlp.up_proj",
        &f.weight,
        f.out,
        &f.hessian,
        &cfg,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.layers.0.mlp.up_proj")
            && err.contains("group size 100 does not divide the layer's 384 inputs"),
        "{err}"
    );
    let err = gptq(
        "layer",
        &f.weight[1..],
        f.out,
        &f.hessian,
        &GptqConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layer: weight of 18431 values for a 48 x 384 layer"),
        "{err}"
    );
    let empty = Hessian::new(f.inp);
    let err = gptq("layer", &f.weight, f.out, &empty, &GptqConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer: no calibration samples"), "{err}");
}

/// A layer of the given codes with one group, zero `zero` and scale 0.5 everywhere.
fn layer(
    out: usize,
    inp: usize,
    bits: u32,
    zero: u32,
    code: impl Fn(usize, usize) -> u8,
) -> QuantizedLinear {
    QuantizedLinear {
        out_features: out,
        in_features: inp,
        bits,
        group_size: inp,
        codes: (0..out * inp).map(|i| code(i / inp, i % inp)).collect(),
        scales: vec![0.5; out],
        zeros: vec![zero; out],
        g_idx: vec![0; inp],
    }
}

#[test]
fn the_checkpoint_words_are_packed_as_the_format_says() {
    // 8 bits: 4 input rows a word, the lowest row in the lowest byte; zeros stored as zero − 1.
    let q = layer(4, 4, 8, 128, |o, c| (16 * o + c) as u8);
    let t = GptqTensors::pack(&q).unwrap();
    assert_eq!(
        t.qweight.iter().map(|&w| w as u32).collect::<Vec<_>>(),
        vec![0x0302_0100, 0x1312_1110, 0x2322_2120, 0x3332_3130]
    );
    assert_eq!(t.qzeros, vec![0x7F7F_7F7F]);
    assert_eq!(t.scales, vec![half::f16::from_f32(0.5); 4]);
    assert_eq!(t.unpack(), q);
    // 4 bits: 8 input rows a word, the lowest row in the lowest nibble.
    let q = layer(8, 16, 4, 8, |o, c| ((c + o) % 16) as u8);
    let t = GptqTensors::pack(&q).unwrap();
    assert_eq!(t.qweight.len(), 2 * 8);
    assert_eq!(t.qweight[0] as u32, 0x7654_3210); // rows 0-7 of output 0
    assert_eq!(t.qweight[8] as u32, 0xFEDC_BA98); // rows 8-15 of output 0
    assert_eq!(t.qweight[1] as u32, 0x8765_4321); // rows 0-7 of output 1
    assert_eq!(t.qzeros, vec![0x7777_7777]);
    assert_eq!(t.unpack(), q);
}

#[test]
fn gptq_layers_survive_the_checkpoint_format() {
    let f = fixture();
    for (name, case) in f.meta["cases"].as_object().unwrap() {
        let cfg = config(case);
        let q = gptq(name, &f.weight, f.out, &f.hessian, &cfg).unwrap();
        match GptqTensors::pack(&q) {
            Ok(t) => {
                let back = t.unpack();
                assert_eq!(
                    (&back.codes, &back.zeros, &back.g_idx),
                    (&q.codes, &q.zeros, &q.g_idx),
                    "{name}"
                );
                for (a, b) in back.scales.iter().zip(&q.scales) {
                    assert!(
                        (a - b).abs() <= b.abs() / 1024.0,
                        "{name}: scale {a} for {b}"
                    );
                }
            }
            // The asymmetric grid gives a zero of 0 to the rows with no negative weight.
            Err(e) => {
                assert!(!cfg.sym, "{name}: {e}");
                assert!(
                    e.to_string().contains("cannot be stored as zero - 1"),
                    "{e}"
                );
            }
        }
    }
}

/// The GPTQ weight slot of a linear layer on the CPU: its weight is the codes' dequantized
/// value (scale · (code − zero), in f32 within one rounding of the f64 arithmetic), and its
/// output is a dense layer's with that weight, to the bit, in f32 and bf16.
#[test]
fn a_gptq_linear_layer_computes_with_its_dequantized_weight() {
    use arenaflow_models::layers::linear::{GptqWeight, Linear, LinearWeight};
    use candle_core::{DType, Device, Tensor};
    let f = fixture();
    let cfg = GptqConfig {
        act_order: true,
        ..GptqConfig::default()
    };
    let q = gptq("layer", &f.weight, f.out, &f.hessian, &cfg).unwrap();
    let exact = q.dequantize();
    let x: Vec<f32> = f.tensors["inputs"].1[..5 * f.inp]
        .iter()
        .map(|&v| v as f32)
        .collect();
    for dtype in [DType::F32, DType::BF16] {
        let slot = GptqWeight::new(&q, dtype, &Device::Cpu).unwrap();
        let dense = slot.dequantize().unwrap();
        assert_eq!(dense.dims2().unwrap(), (f.out, f.inp));
        let got = f32s(&dense);
        let tolerance = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        for (g, e) in got.iter().zip(&exact) {
            assert!(
                (*g as f64 - e).abs() <= tolerance * e.abs().max(1e-3),
                "{dtype:?}: {g} for {e}"
            );
        }
        let xs = Tensor::from_slice(&x, (1, 5, f.inp), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let layer = |weight| Linear {
            weight,
            bias: None,
            lora: None,
            tap: None,
        };
        let quantized = layer(LinearWeight::Gptq(slot))
            .forward_t(&xs, false)
            .unwrap();
        let reference = layer(LinearWeight::Dense(dense))
            .forward_t(&xs, false)
            .unwrap();
        assert_eq!(quantized.dims3().unwrap(), (1, 5, f.out));
        let diff = max_abs_diff(&quantized, &reference);
        assert_eq!(diff, 0.0, "{dtype:?}");
    }
}

/// The llama fixture with every projection GPTQ-quantized (act-order, groups of 24, `bits`)
/// from random calibration inputs, written as a GPTQ checkpoint (`qweight`, `qzeros`,
/// `scales`, `g_idx`, `quantization_config`) into `dir/gptq`, and the dense twin whose
/// projections are those layers' dequantized weights (f16 scales) into `dir/dense`. `edit`
/// may change the quantized checkpoint's tensors and config before they are written.
fn gptq_checkpoint(
    dir: &std::path::Path,
    bits: u32,
    edit: impl Fn(&mut std::collections::BTreeMap<String, candle_core::Tensor>, &mut serde_json::Value),
) {
    use arenaflow_models::checkpoint::write_safetensors;
    use arenaflow_models::weights::SplitMix64;
    use candle_core::{Device, Tensor};
    let base =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama/base");
    let tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let cfg = GptqConfig {
        bits,
        group_size: Some(24),
        act_order: true,
        ..GptqConfig::default()
    };
    let mut rng = SplitMix64::new(16);
    let (mut quantized, mut dense) = (
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    );
    for (name, t) in &tensors {
        let Some(prefix) = name
            .strip_suffix("_proj.weight")
            .map(|p| format!("{p}_proj"))
        else {
            quantized.insert(name.clone(), t.clone());
            dense.insert(name.clone(), t.clone());
            continue;
        };
        let (out, inp) = t.dims2().unwrap();
        let w = f32s(t);
        let mut hessian = Hessian::new(inp);
        for _ in 0..4 {
            let x: Vec<f32> = (0..8 * inp).map(|_| rng.next_normal() as f32).collect();
            hessian.add_sample(&x, 8).unwrap();
        }
        let packed = GptqTensors::pack(&gptq(&prefix, &w, out, &hessian, &cfg).unwrap()).unwrap();
        quantized.extend(packed.to_tensors(&prefix).unwrap());
        let w: Vec<f32> = packed
            .unpack()
            .dequantize()
            .iter()
            .map(|&v| v as f32)
            .collect();
        dense.insert(
            name.clone(),
            Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(),
        );
    }
    let mut quantized_config = config.clone();
    quantized_config["quantization_config"] = arenaflow_models::gptq::GptqSettings {
        bits,
        group_size: Some(24),
        desc_act: true,
        sym: true,
    }
    .to_config();
    edit(&mut quantized, &mut quantized_config);
    for (folder, tensors, config) in [
        ("gptq", quantized, quantized_config),
        ("dense", dense, config),
    ] {
        let out = dir.join(folder);
        std::fs::create_dir_all(&out).unwrap();
        let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
        write_safetensors(&out.join("model.safetensors"), &list).unwrap();
        std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    }
}

/// A GPTQ checkpoint (8 and 4 bits, act-order's g_idx) loads into the GPTQ weight slot and
/// gives the logits of the dense model with its dequantized weights; bad checkpoints fail
/// naming the tensor.
#[test]
fn gptq_checkpoints_load_and_bad_ones_fail_naming_the_tensor() {
    use arenaflow_models::checkpoint::load_classifier;
    use candle_core::{DType, Device};
    let load = |dir: &std::path::Path| {
        load_classifier(dir.to_str().unwrap(), None, DType::F32, &Device::Cpu)
    };
    for bits in [8, 4] {
        let tmp = tempfile::tempdir().unwrap();
        gptq_checkpoint(tmp.path(), bits, |_, _| {});
        let quantized = fixture_logits(&load(&tmp.path().join("gptq")).unwrap());
        let dense = fixture_logits(&load(&tmp.path().join("dense")).unwrap());
        let gap = quantized
            .iter()
            .flatten()
            .zip(dense.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{bits} bits: logits {quantized:?}, dense twin within {gap:.1e}");
        assert!(
            gap < 1e-5,
            "{bits} bits: logits off the dense twin's by {gap}"
        );
    }
    let q_proj = "model.layers.0.self_attn.q_proj";
    let failing = |edit: &dyn Fn(
        &mut std::collections::BTreeMap<String, candle_core::Tensor>,
        &mut serde_json::Value,
    )| {
        let tmp = tempfile::tempdir().unwrap();
        gptq_checkpoint(tmp.path(), 8, |t, c| edit(t, c));
        load(&tmp.path().join("gptq"))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = failing(&|t, _| {
        t.remove(&format!("{q_proj}.qzeros"));
    });
    assert!(
        e.contains(&format!("missing tensor(s): {q_proj}.qzeros")),
        "{e}"
    );
    let e = failing(&|_, c| c["quantization_config"]["group_size"] = 32.into());
    assert!(
        e.contains(&format!(
            "{q_proj}.qweight: group size 32 does not divide the layer's 48 inputs"
        )),
        "{e}"
    );
    let e = failing(&|_, c| c["quantization_config"]["checkpoint_format"] = "gptq_v2".into());
    assert!(
        e.contains("checkpoint_format `gptq_v2` is not read here"),
        "{e}"
    );
    let e = failing(&|t, _| {
        let g = t[&format!("{q_proj}.g_idx")].affine(1.0, 5.0).unwrap();
        t.insert(format!("{q_proj}.g_idx"), g);
    });
    assert!(e.contains(&format!("{q_proj}.g_idx: group")), "{e}");
}

/// The written checkpoint, dequantized by the format's formula in plain Python
/// (`tests/fixtures/gptq/dequantize_checkpoint.py`, written from the format, not from this
/// crate), gives the weights arenaflow computes with, to the bit in f32.
#[test]
fn python_reads_the_weights_arenaflow_uses_from_the_checkpoint() {
    use candle_core::Device;
    for bits in [8, 4] {
        let tmp = tempfile::tempdir().unwrap();
        gptq_checkpoint(tmp.path(), bits, |_, _| {});
        let out = tmp.path().join("python.safetensors");
        let run = std::process::Command::new("python3")
            .arg(fixtures().join("dequantize_checkpoint.py"))
            .arg(tmp.path().join("gptq"))
            .arg(&out)
            .output()
            .expect("python3");
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let python = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let dense = candle_core::safetensors::load(
            tmp.path().join("dense/model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(python.len(), 3 * 7, "{bits} bits: projections");
        for (name, theirs) in &python {
            let gap = max_abs_diff(theirs, &dense[name]);
            assert_eq!(gap, 0.0, "{bits} bits, {name}");
        }
    }
}

/// GPTQ of the whole llama fixture (4 bits, groups of 24, act-order) from 32 random
/// calibration rows: on those rows (the objective's own data) the quantized model's logits
/// stay nearer the float model's than round-to-nearest's do, both with f16 scales; the
/// saved checkpoint loads and
/// gives the in-memory quantized model's logits (which holds its scales in f16 as the
/// checkpoint does).
#[test]
fn a_whole_model_quantizes_saves_and_loads() {
    use arenaflow_models::checkpoint::{load_classifier, save_gptq};
    use arenaflow_models::gptq::GptqSettings;
    use arenaflow_models::layers::linear::{GptqWeight, LinearWeight};
    use arenaflow_models::lora::Projection;
    use arenaflow_models::quantize::quantize_gptq;
    use arenaflow_models::weights::SplitMix64;
    use candle_core::{DType, Device};
    let base =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama/base");
    let load = || load_classifier(base.to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap();
    let mut rng = SplitMix64::new(7);
    let rows: Vec<Vec<u32>> = (0..32)
        .map(|_| (0..16).map(|_| 3 + (rng.next_u64() % 90) as u32).collect())
        .collect();
    let on_rows =
        |model: &arenaflow_models::models::classifier::SequenceClassifier| logits_of(model, &rows);
    let float = on_rows(&load());
    let cfg = GptqConfig {
        bits: 4,
        group_size: Some(24),
        act_order: true,
        ..GptqConfig::default()
    };
    let mut model = load();
    let mut done = Vec::new();
    let quantized = quantize_gptq(&mut model, &rows, &cfg, |l| done.push(l)).unwrap();
    assert_eq!(done, vec![0, 1, 2]);
    assert_eq!(quantized.len(), 3 * 7);
    let gptq_logits = on_rows(&model);
    let mut rtn = load();
    for l in 0..3 {
        for p in Projection::ALL {
            let path = p.path(l);
            let linear = rtn.layer_mut(l).projection_mut(p);
            let w = linear.weight.dense().unwrap();
            let (out, inp) = w.dims2().unwrap();
            let values = f32s(&w);
            let q = GptqTensors::pack(&round_to_nearest(&path, &values, out, inp, &cfg).unwrap())
                .unwrap()
                .unpack();
            linear.weight =
                LinearWeight::Gptq(GptqWeight::new(&q, DType::F32, &Device::Cpu).unwrap());
        }
    }
    let rtn_logits = on_rows(&rtn);
    let off = |a: &[Vec<f32>]| -> f32 {
        a.iter()
            .flatten()
            .zip(float.iter().flatten())
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let (gptq_off, rtn_off) = (off(&gptq_logits), off(&rtn_logits));
    eprintln!("logits off the float model's: GPTQ {gptq_off:.4}, round-to-nearest {rtn_off:.4}");
    assert!(
        gptq_off < rtn_off,
        "GPTQ {gptq_off} not below round-to-nearest {rtn_off}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gptq");
    let settings = GptqSettings {
        bits: 4,
        group_size: Some(24),
        desc_act: true,
        sym: true,
    };
    save_gptq(&model, &quantized, &settings, &dir).unwrap();
    let loaded =
        on_rows(&load_classifier(dir.to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap());
    let gap = loaded
        .iter()
        .flatten()
        .zip(gptq_logits.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("saved and loaded: logits within {gap:.1e} of the in-memory model's");
    assert!(gap < 1e-5, "{gap}");
    assert!(save_gptq(&model, &quantized, &settings, &dir)
        .unwrap_err()
        .to_string()
        .contains("already exists"));
}
