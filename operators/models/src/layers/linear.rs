//! A linear projection `x W^T + b` of the decoder: a frozen weight in its storage slot and
//! an optional LoRA update ([`crate::lora::LoraWeights`]) that it carries.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::lora::LoraWeights;
use crate::weights::Weights;

/// How a linear layer's weight is stored: dense in the model's dtype, or GPTQ's
/// group-quantized integer codes.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Gptq(GptqWeight),
}

impl LinearWeight {
    /// (out, in).
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Gptq(q) => q.codes.dims2(),
        }
    }

    /// The weight as a dense tensor in the model's dtype (GPTQ's codes dequantized).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::Gptq(q) => q.dequantize(),
        }
    }
}

/// A GPTQ-quantized weight on its device: the codes (out, in) as u8 (2 to 8 bits), and per
/// (group, output) the scale and the zero code, in f32; `g_idx` (in) maps
/// each input column to its group.
#[derive(Debug, Clone)]
pub struct GptqWeight {
    pub codes: Tensor,
    /// (2, groups, out) f32: the scales, then the zero codes (`ops::gptq::params`).
    pub params: Tensor,
    /// The dequantized weight's dtype (the model's).
    pub dtype: DType,
    pub g_idx: Tensor,
}

impl GptqWeight {
    /// The codes of `q` on `device`, dequantizing to `dtype`.
    pub fn new(
        q: &crate::gptq::QuantizedLinear,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let (out, inp, groups) = (q.out_features, q.in_features, q.groups());
        let zeros: Vec<f32> = q.zeros.iter().map(|&z| z as f32).collect();
        Ok(Self {
            codes: Tensor::from_slice(&q.codes, (out, inp), device)?,
            // In f32: a checkpoint's f16 scales exactly (bf16 would drop 3 bits of each).
            params: crate::ops::gptq::params(
                &Tensor::from_slice(&q.scales, (groups, out), device)?,
                &Tensor::from_slice(&zeros, (groups, out), device)?,
            )?,
            dtype,
            g_idx: Tensor::from_slice(&q.g_idx, inp, device)?,
        })
    }

    /// A GPTQ checkpoint's `qweight`, `qzeros`, `scales` and `g_idx` under `vb` for an
    /// (out, in) projection, unpacked from their words.
    pub fn load(
        vb: &Weights,
        out: usize,
        inp: usize,
        settings: &crate::gptq::GptqSettings,
    ) -> Result<Self> {
        let bits = settings.bits;
        let per = (32 / bits) as usize;
        let group = settings.group_size.unwrap_or(inp);
        let fail = |tensor: &str, what: String| {
            crate::error::ModelError::Config(format!("{}: {what}", vb.name_of(tensor)))
        };
        if !inp.is_multiple_of(group) {
            return Err(fail(
                "qweight",
                format!("group size {group} does not divide the layer's {inp} inputs"),
            ));
        }
        if !inp.is_multiple_of(per) || !out.is_multiple_of(per) {
            return Err(fail(
                "qweight",
                format!("a {out} x {inp} layer does not pack {per} {bits}-bit codes a word"),
            ));
        }
        let groups = inp / group;
        let words = |name: &str, shape: &[usize]| -> Result<Vec<i32>> {
            Ok(vb
                .get_as(name, shape, DType::I32)?
                .flatten_all()?
                .to_vec1::<i32>()?)
        };
        let tensors = crate::gptq::GptqTensors {
            bits,
            out_features: out,
            in_features: inp,
            qweight: words("qweight", &[inp / per, out])?,
            qzeros: words("qzeros", &[groups, out / per])?,
            scales: vb
                .get_as("scales", &[groups, out], DType::F16)?
                .flatten_all()?
                .to_vec1::<half::f16>()?,
            g_idx: words("g_idx", &[inp])?,
        };
        if let Some(g) = tensors
            .g_idx
            .iter()
            .find(|&&g| g < 0 || g as usize >= groups)
        {
            return Err(fail(
                "g_idx",
                format!("group {g} of a layer with {groups} groups"),
            ));
        }
        Ok(Self::new(&tensors.unpack(), vb.dtype(), vb.device())?)
    }

    /// x (rows, in) times the weight's transpose. Where no gradient is asked for and
    /// `ops::gptq::matmul_path` picks it, on the fused kernel straight from the codes;
    /// otherwise the weight dequantized for the call in one pass, then the dense product
    /// (int8 storage, bf16 compute).
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use crate::ops::gptq::{fused_matmul, matmul_path, MatmulPath};
        let (rows, shape) = (x.dim(0)?, self.codes.dims2()?);
        // The kernel's 16-byte loads need x's rows aligned: a view that starts mid-row
        // takes the other path.
        let aligned = x.is_contiguous() && x.layout().start_offset().is_multiple_of(8);
        if aligned
            && !x.track_op()
            && matmul_path(x.device(), x.dtype(), rows, shape) == MatmulPath::Fused
        {
            return fused_matmul(x, &self.codes, &self.params, &self.g_idx);
        }
        crate::ops::frozen::frozen_matmul_t(x, &self.dequantize()?)
    }

    /// scale · (code − zero) per weight, (out, in) in the model's dtype: the arithmetic in
    /// f32, rounded once.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        crate::ops::gptq::dequantize_stacked(&self.codes, &self.params, &self.g_idx, self.dtype)
    }
}

/// A frozen projection with an optional LoRA update.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
    /// While set, every input the layer sees is kept here (detached): GPTQ's calibration
    /// reads a projection's inputs through it.
    pub tap: Option<Tap>,
}

/// Where a tapped [`Linear`] leaves its inputs.
pub type Tap = std::sync::Arc<std::sync::Mutex<Vec<Tensor>>>;

impl Linear {
    /// `weight` (out x in) and, with `bias`, `bias` (out) under `vb`.
    pub fn new(vb: &Weights, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = match vb.gptq() {
            Some(settings) if vb.contains("qweight") => {
                LinearWeight::Gptq(GptqWeight::load(vb, out, inp, &settings)?)
            }
            _ => LinearWeight::Dense(vb.get("weight", &[out, inp])?),
        };
        let bias = if bias {
            Some(vb.get("bias", &[out])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
            tap: None,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if let Some(tap) = &self.tap {
            tap.lock()
                .map_err(|_| candle_core::Error::Msg("a GPTQ tap's lock is poisoned".into()))?
                .push(xs.detach());
        }
        if let Some((w, lora, adapter_dtype)) = self.one_op(xs, train) {
            // One op whose graph keeps x and the output only (ops::lora_linear); the same
            // bits as the composed ops of `composed`.
            return project(xs, None, |flat| {
                crate::ops::lora_linear::lora_linear(
                    flat,
                    w,
                    lora.a.as_tensor(),
                    lora.b.as_tensor(),
                    lora.scaling,
                    adapter_dtype,
                )
            });
        }
        self.composed(xs, train)
    }

    /// Where training's projection runs as one op (ops::lora_linear): its frozen weight,
    /// adapter and the adapter's matmul dtype. Only where that op's arithmetic is the
    /// composed one's: training, a dense weight, no bias (added before the update), no
    /// dropout (on the adapter's input alone), dtypes the op takes, rows to project.
    pub(crate) fn one_op(
        &self,
        xs: &Tensor,
        train: bool,
    ) -> Option<(&Tensor, &LoraWeights, DType)> {
        let (true, Some(lora), None, LinearWeight::Dense(w)) =
            (train, &self.lora, &self.bias, &self.weight)
        else {
            return None;
        };
        let adapter_dtype = lora.adapter_dtype(xs.dtype());
        (lora.dropout == 0.0
            && crate::ops::lora_linear::takes(xs.dtype(), adapter_dtype)
            && xs.elem_count() > 0)
            .then_some((w, lora, adapter_dtype))
    }

    /// The projection and its LoRA update composed of candle's ops (and arenaflow's frozen
    /// product and LoRA sum): what `forward_t` runs where the one op does not apply, and
    /// the reference the one op is checked against.
    pub fn composed(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let base = match &self.weight {
            LinearWeight::Dense(w) => project(xs, self.bias.as_ref(), |flat| {
                crate::ops::frozen::frozen_matmul_t(flat, w)
            })?,
            LinearWeight::Gptq(q) => project(xs, self.bias.as_ref(), |flat| q.matmul_t(flat))?,
        };
        let Some(lora) = &self.lora else {
            return Ok(base);
        };
        // Outside training the update is a constant: detached, its result records no
        // backward graph (which would keep every activation of the pass alive).
        let (a, b) = if train {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
        };
        let dtype = xs.dtype();
        if lora.autocast && dtype != a.dtype() {
            // torch.autocast: PEFT casts the input to the adapter's f32 for the dropout, the
            // matmuls cast it and the weights to the model's dtype, and the update times the
            // scaling (a Python float: computed in f32, rounded once) is added, rounded again.
            let x = if train && lora.dropout > 0.0 {
                lora_input(xs.to_dtype(a.dtype())?, lora.dropout, train)?.to_dtype(dtype)?
            } else {
                xs.clone()
            };
            let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
            let update = linear(&linear(&x, &a, None)?, &b, None)?;
            // T(base + T(update * scaling)) in one pass.
            return crate::ops::lora::lora_add(&base, &update, lora.scaling);
        }
        // PEFT runs the adapter in its own (f32) dtype and adds the result in the model's.
        let x = lora_input(xs.to_dtype(a.dtype())?, lora.dropout, train)?;
        let update = linear(&linear(&x, &a, None)?, &b, None)?;
        // PEFT's `result + lora_B(lora_A(x)) * scaling`: the sum in f32, one rounding.
        crate::ops::lora::lora_add(&base, &update, lora.scaling)
    }

    /// The weight with the update folded in: W + scaling * B A.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let weight = self.weight.dense()?;
        match &self.lora {
            None => Ok(weight),
            Some(lora) => {
                let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scaling)?;
                let merged = (weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
                merged.to_dtype(weight.dtype())
            }
        }
    }
}

/// The adapter's input: `x` with the LoRA dropout when training.
fn lora_input(x: Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
    if train && p > 0.0 {
        super::dropout::dropout(&x, p).map_err(|e| candle_core::Error::Msg(e.to_string()))
    } else {
        Ok(x)
    }
}

/// `x W^T (+ b)` over the last dimension of a tensor of any rank.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    project(xs, bias, |flat| flat.matmul(&weight.t()?))
}

/// `matmul(x) (+ b)` over the last dimension of a tensor of any rank, `matmul` taking the
/// rows flattened to (rows, in).
fn project(
    xs: &Tensor,
    bias: Option<&Tensor>,
    matmul: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = xs.dims().to_vec();
    let in_features = dims[dims.len() - 1];
    let rows = xs.elem_count() / in_features.max(1);
    let out = matmul(&xs.reshape((rows, in_features))?)?;
    let out = match bias {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = out.dim(D::Minus1)?;
    out.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{draw, values};
    use crate::weights::SplitMix64;
    use candle_core::Var;

    fn max_relative(a: &[f32], b: &[f32]) -> f32 {
        let norm = b.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / norm
    }

    /// A dense projection W with the adapter (A, B) as variables, no bias unless given.
    fn lora_layer(
        w: Tensor,
        bias: Option<Tensor>,
        (a, b): (&Var, &Var),
        (scaling, dropout, autocast): (f64, f64, bool),
    ) -> Linear {
        Linear {
            weight: LinearWeight::Dense(w),
            bias,
            tap: None,
            lora: Some(LoraWeights {
                a: a.clone(),
                b: b.clone(),
                scaling,
                dropout,
                autocast,
            }),
        }
    }

    /// A bf16 projection with an f32 adapter, in PEFT's f32 order and in autocast's: both
    /// near the f32 result, the gradients of the f32 weights f32 in both; autocast's output
    /// is `base + round(update * scaling)` with the update's matmuls in bf16 (written out
    /// here with the weights cast by hand); for an f32 model autocast changes nothing.
    #[test]
    fn autocast_runs_the_adapter_in_the_models_dtype() {
        // alpha 16 / r 12: not a bf16 number, so the scaling's own rounding would show.
        const SCALING: f64 = 16.0 / 12.0;
        let mut rng = SplitMix64::new(3);
        let (m, k, n, r) = (5, 32, 24, 4);
        let (x32, w32) = (draw(&mut rng, (m, k), 1.0), draw(&mut rng, (n, k), 0.2));
        let (a32, b32) = (draw(&mut rng, (r, k), 0.2), draw(&mut rng, (n, r), 0.2));
        let up = draw(&mut rng, (m, n), 1.0);
        let run = |dtype: DType, autocast: bool| {
            let (a, b) = (
                Var::from_tensor(&a32).unwrap(),
                Var::from_tensor(&b32).unwrap(),
            );
            let w = w32.to_dtype(dtype).unwrap();
            let layer = lora_layer(w, None, (&a, &b), (SCALING, 0.0, autocast));
            let out = layer
                .forward_t(&x32.to_dtype(dtype).unwrap(), true)
                .unwrap();
            let loss = (out.to_dtype(DType::F32).unwrap() * &up)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let (ga, gb) = (
                grads.get(a.as_tensor()).unwrap().clone(),
                grads.get(b.as_tensor()).unwrap().clone(),
            );
            assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::F32));
            (values(&out), values(&ga), values(&gb))
        };
        let exact = run(DType::F32, false);
        assert_eq!(run(DType::F32, true), exact, "autocast on an f32 model");
        for autocast in [false, true] {
            let (out, ga, gb) = run(DType::BF16, autocast);
            for (what, got, want) in [
                ("output", &out, &exact.0),
                ("dA", &ga, &exact.1),
                ("dB", &gb, &exact.2),
            ] {
                let err = max_relative(got, want);
                assert!(err < 0.03, "autocast {autocast}: {what} off f32 by {err}");
            }
        }
        // autocast's arithmetic, written out.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = bf(&x32);
        let base = x.matmul(&bf(&w32).t().unwrap()).unwrap();
        let update = x
            .matmul(&bf(&a32).t().unwrap())
            .unwrap()
            .matmul(&bf(&b32).t().unwrap())
            .unwrap();
        let scaled = (update.to_dtype(DType::F32).unwrap() * SCALING)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let want = (base + scaled).unwrap();
        let rounded_scaling = (update * SCALING).unwrap();
        assert_ne!(
            values(&(bf(&x32).matmul(&bf(&w32).t().unwrap()).unwrap() + rounded_scaling).unwrap()),
            values(&want),
            "the fixture should tell a bf16-rounded scaling apart"
        );
        assert_eq!(run(DType::BF16, true).0, values(&want));
        assert_ne!(run(DType::BF16, true).0, run(DType::BF16, false).0);
    }

    /// Training's one-op LoRA projection (ops::lora_linear), which the layer takes here,
    /// against the composed ops it replaces: the output and the gradients of x, A and B the
    /// same bits, for an f32 model, bf16 and f16 models with the adapter in f32 (PEFT) and
    /// in the model's dtype (autocast), on a 3-D input.
    #[test]
    fn the_one_op_projection_matches_the_composed_ops_bit_for_bit() {
        const SCALING: f64 = 16.0 / 12.0;
        let mut rng = SplitMix64::new(9);
        let (rows, seq, k, n, r) = (2, 5, 48, 40, 6);
        let x32 = draw(&mut rng, (rows * seq, k), 1.0)
            .reshape((rows, seq, k))
            .unwrap();
        let (w32, a32, b32) = (
            draw(&mut rng, (n, k), 0.2),
            draw(&mut rng, (r, k), 0.2),
            draw(&mut rng, (n, r), 0.2),
        );
        let up = draw(&mut rng, (rows * seq, n), 1.0)
            .reshape((rows, seq, n))
            .unwrap();
        for (dtype, autocast) in [
            (DType::F32, false),
            (DType::F32, true),
            (DType::BF16, false),
            (DType::BF16, true),
            (DType::F16, false),
            (DType::F16, true),
        ] {
            let run = |fused: bool| {
                let x = Var::from_tensor(&x32.to_dtype(dtype).unwrap()).unwrap();
                let (a, b) = (
                    Var::from_tensor(&a32).unwrap(),
                    Var::from_tensor(&b32).unwrap(),
                );
                let w = w32.to_dtype(dtype).unwrap();
                let layer = lora_layer(w, None, (&a, &b), (SCALING, 0.0, autocast));
                assert!(layer.one_op(x.as_tensor(), true).is_some());
                assert!(layer.one_op(x.as_tensor(), false).is_none());
                let out = if fused {
                    layer.forward_t(x.as_tensor(), true).unwrap()
                } else {
                    layer.composed(x.as_tensor(), true).unwrap()
                };
                let loss = (out.to_dtype(DType::F32).unwrap() * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                let grad = |v: &Var| {
                    let g = grads.get(v.as_tensor()).unwrap();
                    // No graph behind a variable's gradient: it would keep the layer's
                    // tensors alive in the optimizer's state, step after step.
                    assert!(!g.track_op(), "fused {fused}: a gradient keeps a graph");
                    (g.dtype(), g.dims().to_vec(), values(g))
                };
                (values(&out), grad(&x), grad(&a), grad(&b))
            };
            let (fused, composed) = (run(true), run(false));
            let what = format!("{dtype:?}, autocast {autocast}");
            assert_eq!(fused.0, composed.0, "{what}: output");
            assert_eq!(fused.1, composed.1, "{what}: dx");
            assert_eq!(fused.2, composed.2, "{what}: dA");
            assert_eq!(fused.3, composed.3, "{what}: dB");
            assert_eq!(fused.2 .0, DType::F32, "{what}: dA's dtype");
        }
    }

    /// Where the one op's arithmetic is not the composed one's (a bias, added before the
    /// update; dropout on the adapter's input) the layer keeps the composed ops: the same
    /// output as `composed` (with dropout, under one dropout key).
    #[test]
    fn a_bias_or_dropout_keeps_the_composed_ops() {
        let mut rng = SplitMix64::new(4);
        let x = draw(&mut rng, (3, 8), 1.0);
        let (w, a, b) = (
            draw(&mut rng, (4, 8), 0.2),
            draw(&mut rng, (2, 8), 0.2),
            draw(&mut rng, (4, 2), 0.2),
        );
        let bias = draw(&mut rng, (1, 4), 1.0).flatten_all().unwrap();
        for (bias, dropout) in [(Some(bias), 0.0), (None, 0.3)] {
            let (av, bv) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let layer = lora_layer(w.clone(), bias, (&av, &bv), (2.0, dropout, false));
            assert!(layer.one_op(&x, true).is_none(), "dropout {dropout}");
            let run = |f: &dyn Fn() -> Tensor| values(&super::super::dropout::with_key(7, f));
            assert_eq!(
                run(&|| layer.forward_t(&x, true).unwrap()),
                run(&|| layer.composed(&x, true).unwrap()),
                "dropout {dropout}"
            );
        }
    }
}
