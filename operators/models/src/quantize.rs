//! GPTQ of a whole sequence classifier (issue 16, point 1), as the reference's llama.py runs
//! it: the calibration rows' hidden states go through the decoder layer by layer; in each
//! layer the projections are quantized in the reference's `true_sequential` order (q, k and
//! v; o; gate and up; down), each group's Hessian gathered from its inputs with the groups
//! before it already quantized; then the layer's outputs, through its quantized weights, are
//! the next layer's inputs. The score head and the norms stay in float, as transformers
//! does.

use std::collections::BTreeMap;

use candle_core::DType;

use crate::error::{ModelError, Result};
use crate::gptq::{gptq, GptqConfig, GptqTensors, Hessian, QuantizedLinear};
use crate::layers::linear::{GptqWeight, LinearWeight, Tap};
use crate::lora::Projection;
use crate::models::classifier::SequenceClassifier;
use crate::models::{PaddedBatch, PaddingSide};

/// The reference's `true_sequential` groups; the projections of a group share one input.
const GROUPS: [&[Projection]; 4] = [
    &[Projection::Q, Projection::K, Projection::V],
    &[Projection::O],
    &[Projection::Gate, Projection::Up],
    &[Projection::Down],
];

/// Quantizes every projection of `model` in place (its weights become GPTQ slots, so that
/// it runs as the quantized model) from the calibration `rows` (token ids, one sample
/// each), and returns the layers, keyed by path (`model.layers.0.self_attn.q_proj`), for
/// [`crate::checkpoint::save_gptq`]. `progress` hears each layer's index when it is done.
pub fn quantize_gptq(
    model: &mut SequenceClassifier,
    rows: &[Vec<u32>],
    cfg: &GptqConfig,
    mut progress: impl FnMut(usize),
) -> Result<BTreeMap<String, QuantizedLinear>> {
    if model.lora.is_some() {
        return Err(ModelError::Input(
            "gptq: the model carries a LoRA adapter; merge it into the weights first".into(),
        ));
    }
    if rows.is_empty() || rows.iter().any(|r| r.is_empty()) {
        return Err(ModelError::Input(
            "gptq: no calibration rows, or an empty one".into(),
        ));
    }
    let pad = model.pad_token_id().unwrap_or(0);
    let mut samples = Vec::with_capacity(rows.len());
    for row in rows {
        let batch = PaddedBatch::pad(&[row.as_slice()], pad, PaddingSide::Right)?;
        samples.push((model.batch_state(&batch, false)?, model.embed(&batch)?));
    }
    let (dtype, device) = (model.dtype(), model.device().clone());
    let mut quantized = BTreeMap::new();
    for l in 0..model.layers.len() {
        for group in GROUPS {
            let tap = Tap::default();
            model.layers[l].projection_mut(group[0]).tap = Some(tap.clone());
            let inputs = model.layers[l].projection(group[0]).weight.dims()?.1;
            let mut hessian = Hessian::new(inputs);
            let gathered: Result<()> = samples.iter().try_for_each(|(state, xs)| {
                model.layers[l].forward_t(xs, state, false)?;
                let seen = std::mem::take(&mut *tap.lock().expect("the tap's lock"));
                for x in seen {
                    let values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    hessian.add_sample(&values, values.len() / inputs)?;
                }
                Ok(())
            });
            model.layers[l].projection_mut(group[0]).tap = None;
            gathered?;
            for &p in group {
                let path = p.path(l);
                let linear = model.layers[l].projection_mut(p);
                let weight = linear.weight.dense()?.to_dtype(DType::F32)?;
                let out = weight.dims2()?.0;
                let values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
                let q = gptq(&path, &values, out, &hessian, cfg)?;
                // The layer as the checkpoint will hold it (scales in f16), so that the
                // layers after it calibrate on what ships; packing refuses what the format
                // cannot hold before any more time is spent.
                let shipped = GptqTensors::pack(&q)
                    .map_err(|e| ModelError::Input(format!("{path}: {e}")))?
                    .unpack();
                linear.weight = LinearWeight::Gptq(GptqWeight::new(&shipped, dtype, &device)?);
                quantized.insert(path, q);
            }
        }
        for (state, xs) in samples.iter_mut() {
            *xs = model.layers[l].forward_t(xs, state, false)?;
        }
        progress(l);
    }
    Ok(quantized)
}
