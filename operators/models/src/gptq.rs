//! GPTQ (Frantar et al. 2022) for one linear layer, as the reference implementation
//! (IST-DASLab/gptq: `GPTQ.add_batch`, `GPTQ.fasterquant`, `Quantizer` with one scale per
//! output row and group) does it: the layer's input Hessian H = 2/n Σ x xᵀ over n calibration
//! samples, damped by `damp_percent` of its mean diagonal, its inverse's upper Cholesky
//! factor, then the columns quantized one by one in blocks of `block_size`, each column's
//! rounding error spread over the columns not yet quantized (within the block at once,
//! beyond it once per block: the "lazy batch" update), optionally in order of decreasing
//! H diagonal (act-order). Groups of `group_size` input columns share a scale and zero per
//! output row.
//!
//! In f64 on the CPU (the reference runs in f32 on the GPU, where one flipped code carries
//! into every later column: its own f32 and f64 runs give the same value for 81-100% of the
//! weights of `tests/fixtures/gptq`, with equal output errors to 5 digits). The reference's
//! behaviour is kept where it is surprising: a group's grid is found from the weights as
//! they stood when the block began, and the symmetric grid of a row with no negative weight
//! spans [0, max] around the middle code, so that its upper half clips.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

use crate::error::{ModelError, Result};

/// GPTQ's settings, named as transformers' GPTQConfig names them.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqConfig {
    /// 8 or 4 (any width from 2 to 8 works).
    pub bits: u32,
    /// Input columns sharing a scale and zero; `None`: one group per row (the whole width).
    pub group_size: Option<usize>,
    /// Damping added to H's diagonal, as a fraction of its mean (the reference's percdamp:
    /// 0.01; transformers' GPTQConfig defaults to 0.1).
    pub damp_percent: f64,
    /// Columns quantized between two updates of the rest of the matrix.
    pub block_size: usize,
    /// Quantize the columns in order of decreasing H diagonal (`desc_act`).
    pub act_order: bool,
    /// Symmetric grid: the zero is the middle code.
    pub sym: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self {
            bits: 8,
            group_size: Some(128),
            damp_percent: 0.01,
            block_size: 128,
            act_order: false,
            sym: true,
        }
    }
}

impl GptqConfig {
    /// The settings for a layer of `in_features` inputs; errors name the layer.
    fn check(&self, name: &str, in_features: usize) -> Result<()> {
        self.check_widths(in_features)
            .map_err(|e| ModelError::Config(format!("{name}: {e}")))
    }

    fn check_widths(&self, in_features: usize) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(ModelError::Config(format!(
                "gptq: bits must be 2 to 8, not {}",
                self.bits
            )));
        }
        if let Some(g) = self.group_size {
            if g == 0 || !in_features.is_multiple_of(g) {
                return Err(ModelError::Config(format!(
                    "gptq: group size {g} does not divide the layer's {in_features} inputs"
                )));
            }
        }
        if self.block_size == 0 {
            return Err(ModelError::Config("gptq: block size 0".into()));
        }
        if !(self.damp_percent > 0.0 && self.damp_percent.is_finite()) {
            return Err(ModelError::Config(format!(
                "gptq: damp_percent must be positive, not {}",
                self.damp_percent
            )));
        }
        Ok(())
    }

    fn maxq(&self) -> f64 {
        ((1u32 << self.bits) - 1) as f64
    }
}

/// A layer's calibration statistic H = 2/n Σ x xᵀ, accumulated sample by sample as
/// `GPTQ.add_batch` does (each call one sample: H scaled by n/(n+1), then 2/(n+1) x xᵀ added).
#[derive(Debug, Clone)]
pub struct Hessian {
    h: Mat<f64>,
    samples: usize,
}

impl Hessian {
    pub fn new(in_features: usize) -> Self {
        Self {
            h: Mat::zeros(in_features, in_features),
            samples: 0,
        }
    }

    pub fn in_features(&self) -> usize {
        self.h.nrows()
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// One calibration sample's inputs to the layer: `tokens` rows of `in_features`,
    /// row-major.
    pub fn add_sample(&mut self, inputs: &[f32], tokens: usize) -> Result<()> {
        let dim = self.in_features();
        if inputs.len() != tokens * dim {
            return Err(ModelError::Input(format!(
                "gptq: a sample of {tokens} tokens x {dim} inputs needs {} values, not {}",
                tokens * dim,
                inputs.len()
            )));
        }
        let x = Mat::<f64>::from_fn(tokens, dim, |t, c| inputs[t * dim + c] as f64);
        let n = self.samples as f64;
        let keep = n / (n + 1.0);
        self.h = &self.h * faer::Scale(keep);
        self.samples += 1;
        let scale = 2.0 / self.samples as f64;
        matmul(
            self.h.as_mut(),
            Accum::Add,
            x.transpose(),
            x.as_ref(),
            scale,
            Par::rayon(0),
        );
        Ok(())
    }
}

/// A layer quantized to integer codes with a scale and zero per (group, output row).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    /// Input columns per group (the whole width without groups).
    pub group_size: usize,
    /// (out, in), row-major.
    pub codes: Vec<u8>,
    /// (groups, out).
    pub scales: Vec<f64>,
    /// (groups, out): the code that stands for 0.
    pub zeros: Vec<u32>,
    /// The group of each input column (in its own order, not act-order's).
    pub g_idx: Vec<u32>,
}

impl QuantizedLinear {
    pub fn groups(&self) -> usize {
        self.scales.len() / self.out_features.max(1)
    }

    /// The weight the codes stand for: scale · (code − zero), (out, in) row-major.
    pub fn dequantize(&self) -> Vec<f64> {
        let (out, inp) = (self.out_features, self.in_features);
        let mut w = vec![0.0; out * inp];
        for o in 0..out {
            for c in 0..inp {
                let g = self.g_idx[c] as usize * out + o;
                w[o * inp + c] =
                    self.scales[g] * (self.codes[o * inp + c] as f64 - self.zeros[g] as f64);
            }
        }
        w
    }
}

/// A layer's (out, in) row-major weight as f64, column-major: one input's weights contiguous.
fn column_major(weight: &[f32], out: usize, inp: usize) -> Vec<f64> {
    (0..inp * out)
        .map(|i| weight[(i % out) * inp + i / out] as f64)
        .collect()
}

/// `Quantizer.find_params(x, weight=True)` with one scale and zero per row, over the
/// columns `cols` of `w` (out x in, column-major).
fn find_params(w: &[f64], out: usize, cols: std::ops::Range<usize>, cfg: &GptqConfig) -> Grid {
    let maxq = cfg.maxq();
    let mut grid = Grid {
        scale: vec![0.0; out],
        zero: vec![0.0; out],
    };
    for o in 0..out {
        let (mut xmin, mut xmax) = (0.0f64, 0.0f64);
        for c in cols.clone() {
            let v = w[c * out + o];
            xmin = xmin.min(v);
            xmax = xmax.max(v);
        }
        if cfg.sym {
            xmax = xmax.max(xmin.abs());
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            (xmin, xmax) = (-1.0, 1.0);
        }
        let scale = (xmax - xmin) / maxq;
        grid.scale[o] = scale;
        grid.zero[o] = if cfg.sym {
            (maxq + 1.0) / 2.0
        } else {
            (-xmin / scale).round_ties_even()
        };
    }
    grid
}

/// One group's scale and zero per output row.
struct Grid {
    scale: Vec<f64>,
    zero: Vec<f64>,
}

impl Grid {
    /// This group's row of scales and of zeros, after the groups before it.
    fn append_to(&self, scales: &mut Vec<f64>, zeros: &mut Vec<u32>) {
        scales.extend_from_slice(&self.scale);
        zeros.extend(self.zero.iter().map(|&z| z as u32));
    }

    /// `quant.quantize` of row `o`'s value: its code and the value the code stands for.
    fn quantize(&self, o: usize, v: f64, maxq: f64) -> (f64, f64) {
        let q = ((v / self.scale[o]).round_ties_even() + self.zero[o]).clamp(0.0, maxq);
        (q, self.scale[o] * (q - self.zero[o]))
    }
}

/// GPTQ of `weight` ((out, in), row-major, as a linear layer stores it) with `hessian`
/// gathered from the layer's inputs. The name goes into errors.
pub fn gptq(
    name: &str,
    weight: &[f32],
    out: usize,
    hessian: &Hessian,
    cfg: &GptqConfig,
) -> Result<QuantizedLinear> {
    let inp = hessian.in_features();
    cfg.check(name, inp)?;
    if weight.len() != out * inp {
        return Err(ModelError::Input(format!(
            "{name}: weight of {} values for a {out} x {inp} layer",
            weight.len()
        )));
    }
    if hessian.samples == 0 {
        return Err(ModelError::Input(format!("{name}: no calibration samples")));
    }
    let maxq = cfg.maxq();
    // W column-major (out x in): a column (one input's weights) is contiguous.
    let mut w = column_major(weight, out, inp);
    let mut h = hessian.h.clone();
    let mut grid = find_params(&w, out, 0..inp, cfg);
    for c in 0..inp {
        if h[(c, c)] == 0.0 {
            h[(c, c)] = 1.0;
            w[c * out..(c + 1) * out].fill(0.0);
        }
    }
    let perm: Vec<usize> = if cfg.act_order {
        let mut p: Vec<usize> = (0..inp).collect();
        p.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]));
        p
    } else {
        (0..inp).collect()
    };
    if cfg.act_order {
        w = perm
            .iter()
            .flat_map(|&c| w[c * out..(c + 1) * out].to_vec())
            .collect();
        h = Mat::from_fn(inp, inp, |i, j| h[(perm[i], perm[j])]);
    }
    let damp = cfg.damp_percent * (0..inp).map(|c| h[(c, c)]).sum::<f64>() / inp as f64;
    for c in 0..inp {
        h[(c, c)] += damp;
    }
    let not_pd = |e: faer::linalg::solvers::LltError| {
        ModelError::Input(format!(
            "{name}: the calibration Hessian is not positive definite after damping ({e:?}); raise damp_percent or add calibration rows"
        ))
    };
    let inverse = h.llt(Side::Lower).map_err(not_pd)?.inverse();
    // The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): the transposed lower factor.
    let hinv: Mat<f64> = inverse
        .llt(Side::Lower)
        .map_err(not_pd)?
        .L()
        .transpose()
        .to_owned();

    let mut codes = vec![0u8; out * inp];
    let (mut scales, mut zeros) = (Vec::new(), Vec::new());
    if cfg.group_size.is_none() {
        grid.append_to(&mut scales, &mut zeros);
    }
    let mut i1 = 0;
    while i1 < inp {
        let i2 = (i1 + cfg.block_size).min(inp);
        let count = i2 - i1;
        let mut block = w[i1 * out..i2 * out].to_vec();
        let mut err = vec![0.0; count * out];
        for i in 0..count {
            let col = i1 + i;
            if let Some(g) = cfg.group_size {
                if col.is_multiple_of(g) {
                    // From W as it stood when this block began, as the reference reads it.
                    grid = find_params(&w, out, col..col + g, cfg);
                    grid.append_to(&mut scales, &mut zeros);
                }
            }
            let d = hinv[(col, col)];
            for o in 0..out {
                let v = block[i * out + o];
                let (q, value) = grid.quantize(o, v, maxq);
                codes[o * inp + perm[col]] = q as u8;
                err[i * out + o] = (v - value) / d;
            }
            let e = &err[i * out..(i + 1) * out];
            for j in i..count {
                let factor = hinv[(col, i1 + j)];
                for (x, &eo) in block[j * out..(j + 1) * out].iter_mut().zip(e) {
                    *x -= eo * factor;
                }
            }
        }
        // The rest of the matrix once per block: W[:, i2:] -= Err · H⁻¹[i1:i2, i2:].
        if i2 < inp {
            let err = MatRef::from_column_major_slice(&err, out, count);
            let rest = MatMut::from_column_major_slice_mut(&mut w[i2 * out..], out, inp - i2);
            matmul(
                rest,
                Accum::Add,
                err,
                hinv.as_ref().submatrix(i1, i2, count, inp - i2),
                -1.0,
                Par::rayon(0),
            );
        }
        i1 = i2;
    }
    let group_size = cfg.group_size.unwrap_or(inp);
    let mut g_idx = vec![0u32; inp];
    for (position, &c) in perm.iter().enumerate() {
        g_idx[c] = (position / group_size) as u32;
    }
    Ok(QuantizedLinear {
        out_features: out,
        in_features: inp,
        bits: cfg.bits,
        group_size,
        codes,
        scales,
        zeros,
        g_idx,
    })
}

/// The baseline GPTQ is measured against: each group's grid from its own weights and every
/// weight to its nearest code, no error feedback.
pub fn round_to_nearest(
    name: &str,
    weight: &[f32],
    out: usize,
    inp: usize,
    cfg: &GptqConfig,
) -> Result<QuantizedLinear> {
    cfg.check(name, inp)?;
    let maxq = cfg.maxq();
    let w = column_major(weight, out, inp);
    let group_size = cfg.group_size.unwrap_or(inp);
    let mut codes = vec![0u8; out * inp];
    let (mut scales, mut zeros) = (Vec::new(), Vec::new());
    for start in (0..inp).step_by(group_size) {
        let grid = find_params(&w, out, start..start + group_size, cfg);
        for c in start..start + group_size {
            for o in 0..out {
                codes[o * inp + c] = grid.quantize(o, w[c * out + o], maxq).0 as u8;
            }
        }
        grid.append_to(&mut scales, &mut zeros);
    }
    Ok(QuantizedLinear {
        out_features: out,
        in_features: inp,
        bits: cfg.bits,
        group_size,
        codes,
        scales,
        zeros,
        g_idx: (0..inp).map(|c| (c / group_size) as u32).collect(),
    })
}

/// One layer's tensors in the GPTQ checkpoint format transformers and optimum write
/// (`checkpoint_format: "gptq"`): `qweight` int32 (in·bits/32, out), each word holding
/// 32/bits consecutive input rows of one output column, the lowest row in the lowest bits;
/// `qzeros` int32 (groups, out·bits/32) holding zero − 1, packed the same way along the
/// outputs; `scales` f16 (groups, out); `g_idx` int32 (in).
#[derive(Debug, Clone, PartialEq)]
pub struct GptqTensors {
    pub bits: u32,
    pub out_features: usize,
    pub in_features: usize,
    pub qweight: Vec<i32>,
    pub qzeros: Vec<i32>,
    pub scales: Vec<half::f16>,
    pub g_idx: Vec<i32>,
}

impl GptqTensors {
    /// Codes per 32-bit word.
    fn per_word(bits: u32) -> usize {
        (32 / bits) as usize
    }

    /// The checkpoint's tensors of `q` (its scales rounded to f16, as the ecosystem stores
    /// them). Widths 2, 4 and 8 pack whole codes into words; 3 bits (which straddles
    /// words) is not written.
    pub fn pack(q: &QuantizedLinear) -> Result<Self> {
        let (out, inp, bits) = (q.out_features, q.in_features, q.bits);
        if ![2, 4, 8].contains(&bits) {
            return Err(ModelError::Config(format!(
                "gptq: {bits}-bit codes do not pack into 32-bit words (2, 4 or 8)"
            )));
        }
        let per = Self::per_word(bits);
        if !inp.is_multiple_of(per) || !out.is_multiple_of(per) {
            return Err(ModelError::Config(format!(
                "gptq: a {out} x {inp} layer does not pack {per} codes a word"
            )));
        }
        let mut qweight = vec![0u32; inp / per * out];
        for o in 0..out {
            for c in 0..inp {
                qweight[(c / per) * out + o] |=
                    (q.codes[o * inp + c] as u32) << (bits as usize * (c % per));
            }
        }
        let groups = q.groups();
        let mut qzeros = vec![0u32; groups * out / per];
        let mask = (1u32 << bits) - 1;
        for g in 0..groups {
            for o in 0..out {
                // zero − 1: a zero of 0 has no place (the format's readers add 1 back, so
                // a wrapped −1 would read as 2^bits).
                let zero = q.zeros[g * out + o];
                if zero == 0 || zero > mask {
                    return Err(ModelError::Config(format!(
                        "gptq: zero {zero} (group {g}, output {o}) cannot be stored as zero - 1 in checkpoint_format \"gptq\""
                    )));
                }
                let stored = zero - 1;
                qzeros[g * (out / per) + o / per] |= stored << (bits as usize * (o % per));
            }
        }
        Ok(Self {
            bits,
            out_features: out,
            in_features: inp,
            qweight: qweight.into_iter().map(|w| w as i32).collect(),
            qzeros: qzeros.into_iter().map(|w| w as i32).collect(),
            scales: q.scales.iter().map(|&s| half::f16::from_f64(s)).collect(),
            g_idx: q.g_idx.iter().map(|&g| g as i32).collect(),
        })
    }

    /// The checkpoint's four tensors of the projection at `path`
    /// (`model.layers.0.self_attn.q_proj`), named and shaped as the format has them.
    pub fn to_tensors(&self, path: &str) -> Result<Vec<(String, candle_core::Tensor)>> {
        use candle_core::{Device, Tensor};
        let per = Self::per_word(self.bits);
        let (out, inp) = (self.out_features, self.in_features);
        let groups = self.scales.len() / out;
        let cpu = &Device::Cpu;
        Ok(vec![
            (
                format!("{path}.qweight"),
                Tensor::from_slice(&self.qweight, (inp / per, out), cpu)?,
            ),
            (
                format!("{path}.qzeros"),
                Tensor::from_slice(&self.qzeros, (groups, out / per), cpu)?,
            ),
            (
                format!("{path}.scales"),
                Tensor::from_slice(&self.scales, (groups, out), cpu)?,
            ),
            (
                format!("{path}.g_idx"),
                Tensor::from_slice(&self.g_idx, inp, cpu)?,
            ),
        ])
    }

    /// The codes, zeros and scales back out of the words.
    pub fn unpack(&self) -> QuantizedLinear {
        let (out, inp, bits) = (self.out_features, self.in_features, self.bits);
        let per = Self::per_word(bits);
        let mask = (1u32 << bits) - 1;
        let mut codes = vec![0u8; out * inp];
        for o in 0..out {
            for c in 0..inp {
                let word = self.qweight[(c / per) * out + o] as u32;
                codes[o * inp + c] = ((word >> (bits as usize * (c % per))) & mask) as u8;
            }
        }
        let groups = self.scales.len() / out;
        let mut zeros = vec![0u32; groups * out];
        for g in 0..groups {
            for o in 0..out {
                let word = self.qzeros[g * (out / per) + o / per] as u32;
                zeros[g * out + o] = ((word >> (bits as usize * (o % per))) & mask) + 1;
            }
        }
        QuantizedLinear {
            out_features: out,
            in_features: inp,
            bits,
            group_size: inp / groups.max(1),
            codes,
            scales: self.scales.iter().map(|s| s.to_f64()).collect(),
            zeros,
            g_idx: self.g_idx.iter().map(|&g| g as u32).collect(),
        }
    }
}

/// A checkpoint's `quantization_config` (config.json), as transformers' GPTQConfig writes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqSettings {
    pub bits: u32,
    /// `None` for `group_size: -1` (one group per row).
    pub group_size: Option<usize>,
    pub desc_act: bool,
    pub sym: bool,
}

impl GptqSettings {
    /// The GPTQ settings of a parsed config.json: `None` without a `quantization_config`;
    /// an error for another method or format, or bits this crate does not read.
    pub fn from_config(raw: &serde_json::Value) -> Result<Option<Self>> {
        let Some(q) = raw.get("quantization_config") else {
            return Ok(None);
        };
        let bad =
            |what: String| ModelError::Config(format!("config.json quantization_config: {what}"));
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "gptq" {
            return Err(bad(format!(
                "quant_method `{method}` is not read here (gptq is)"
            )));
        }
        let format = q
            .get("checkpoint_format")
            .and_then(|f| f.as_str())
            .unwrap_or("gptq");
        if format != "gptq" {
            return Err(bad(format!(
                "checkpoint_format `{format}` is not read here (gptq is: zeros stored as zero - 1)"
            )));
        }
        let bits = q.get("bits").and_then(|b| b.as_u64()).unwrap_or(0) as u32;
        if ![2, 4, 8].contains(&bits) {
            return Err(bad(format!("bits {bits}: 2, 4 or 8 are read")));
        }
        let group_size = match q.get("group_size").and_then(|g| g.as_i64()) {
            Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            other => return Err(bad(format!("group_size {other:?}"))),
        };
        let flag =
            |name: &str, default: bool| q.get(name).and_then(|v| v.as_bool()).unwrap_or(default);
        Ok(Some(Self {
            bits,
            group_size,
            desc_act: flag("desc_act", false),
            sym: flag("sym", true),
        }))
    }

    /// The `quantization_config` object for config.json.
    pub fn to_config(&self) -> serde_json::Value {
        serde_json::json!({
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size.map(|g| g as i64).unwrap_or(-1),
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": "gptq",
        })
    }
}
