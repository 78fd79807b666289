//! A GPTQ weight dequantized in one pass: w[o, c] = T((code[o, c] - zero[g, o]) * scale[g, o])
//! with g = g_idx[c], the arithmetic in f32 and one rounding to the model's dtype T. Composed
//! from candle's ops this took five passes over the (out, in) weight (cast, two gathers of
//! the per-group tensors, subtract, multiply) and three temporaries of its size in f32; the
//! op reads the one-byte codes once and writes the weight once. The projection then runs as
//! a dense one (cuBLAS on the GPU): int8 storage, dequantized per call. The CUDA side is
//! `kernels/gptq.cu`; the CPU side computes the same, bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Element};

/// The op: `codes` (out, in) u8, `params` (2, groups, out) f32 (the scales, then the
/// zeros: a checkpoint's f16 scales held exactly), `g_idx` (in) u32; the weight in `dtype`.
struct Dequantize {
    dtype: DType,
}

impl Dequantize {
    /// (out, in, groups), checked.
    fn dims(cl: &Layout, pl: &Layout, gl: &Layout) -> Result<(usize, usize, usize)> {
        let (out, inp) = cl.shape().dims2()?;
        let (two, groups, pout) = pl.shape().dims3()?;
        if two != 2 || pout != out || gl.shape().elem_count() != inp || groups == 0 {
            candle_core::bail!(
                "gptq dequantize: codes {:?}, scales and zeros {:?}, g_idx {:?}",
                cl.shape(),
                pl.shape(),
                gl.shape()
            );
        }
        Ok((out, inp, groups))
    }

    fn cpu<T: Element>(
        codes: &[u8],
        params: &[f32],
        g_idx: &[u32],
        (out, inp, groups): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        if let Some(g) = g_idx.iter().find(|&&g| g as usize >= groups) {
            candle_core::bail!("gptq dequantize: g_idx {g} of {groups} groups");
        }
        let (scales, zeros) = params.split_at(groups * out);
        let mut w = vec![T::from_f32(0.0); out * inp];
        w.par_chunks_mut(inp)
            .zip(codes.par_chunks(inp))
            .enumerate()
            .for_each(|(o, (row, codes))| {
                for ((w, &code), &g) in row.iter_mut().zip(codes).zip(g_idx) {
                    let at = g as usize * out + o;
                    *w = T::from_f32((code as f32 - zeros[at]) * scales[at]);
                }
            });
        Ok(w)
    }
}

impl CustomOp3 for Dequantize {
    fn name(&self) -> &'static str {
        "arenaflow-gptq-dequantize"
    }

    fn cpu_fwd(
        &self,
        c: &CpuStorage,
        cl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Self::dims(cl, pl, gl)?;
        let (CpuStorage::U8(codes), CpuStorage::U32(g_idx)) = (c, g) else {
            candle_core::bail!(
                "gptq dequantize: codes {:?} and g_idx {:?}, not u8 and u32",
                c.dtype(),
                g.dtype()
            );
        };
        let codes = contiguous(codes, cl, "gptq codes")?;
        let g_idx = contiguous(g_idx, gl, "gptq g_idx")?;
        let CpuStorage::F32(p) = p else {
            candle_core::bail!(
                "gptq dequantize: scales and zeros in {:?}, not f32",
                p.dtype()
            );
        };
        let p = contiguous(p, pl, "gptq scales and zeros")?;
        let w = match self.dtype {
            DType::F32 => CpuStorage::F32(Self::cpu(codes, p, g_idx, dims)?),
            DType::BF16 => CpuStorage::BF16(Self::cpu(codes, p, g_idx, dims)?),
            DType::F16 => CpuStorage::F16(Self::cpu(codes, p, g_idx, dims)?),
            other => candle_core::bail!("gptq dequantize: a weight in {other:?}"),
        };
        Ok((w, cl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "gptq dequantize",
            self.dtype,
            &p.device.clone(),
            (c, cl),
            (p, pl),
            (g, gl)
        )
    }
}

#[cfg(feature = "cuda")]
impl Dequantize {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (c, cl): (&candle_core::CudaStorage, &Layout),
        (p, pl): (&candle_core::CudaStorage, &Layout),
        (g, gl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{launch, suffix, view, GPTQ};
        let (out, inp, groups) = Self::dims(cl, pl, gl)?;
        if p.dtype() != DType::F32 {
            return Err(crate::cuda::fail(format!(
                "gptq dequantize: scales and zeros in {:?}, not f32",
                p.dtype()
            )));
        }
        let (cv, pv, gv) = (view!(c, cl, u8), view!(p, pl, f32), view!(g, gl, u32));
        let n = out * inp;
        // SAFETY: the grid-stride loop writes all n elements.
        let w = unsafe { dev.alloc::<T>(n) }?;
        let cfg = crate::cuda::grid_stride(n);
        let (o, i, gs) = (out as u32, inp as u32, groups as u32);
        // SAFETY: gptq_dequantize_* take (codes, params, g_idx, w, out, in, groups): codes
        // and w out x in, params 2 x groups x out, g_idx in (each entry below groups: the
        // loader checks it, a larger one reads zero).
        launch!(dev, GPTQ, format!("gptq_dequantize_{}", suffix(self.dtype)?), cfg;
            &cv, &pv, &gv, &w, &o, &i, &gs);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(w, dev.clone()),
            cl.shape().clone(),
        ))
    }
}

/// GPTQ's per-(group, output) `scales` and `zeros` as the kernels take them: one
/// (2, groups, out) f32 tensor, the scales, then the zeros (a checkpoint's f16 scales held
/// exactly). A loaded weight stacks them once ([`crate::layers::linear::GptqWeight`]).
pub fn params(scales: &Tensor, zeros: &Tensor) -> Result<Tensor> {
    Tensor::stack(
        &[scales.to_dtype(DType::F32)?, zeros.to_dtype(DType::F32)?],
        0,
    )?
    .contiguous()
}

/// The dense (out, in) weight in `dtype` of GPTQ `codes` (out, in) u8, `scales` and
/// `zeros` (groups, out, taken in f32) and `g_idx` (in) u32: scale · (code − zero), in f32,
/// rounded once.
pub fn dequantize(
    codes: &Tensor,
    scales: &Tensor,
    zeros: &Tensor,
    g_idx: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    dequantize_stacked(codes, &params(scales, zeros)?, g_idx, dtype)
}

/// [`dequantize`] with the scales and zeros already stacked by [`params`].
pub fn dequantize_stacked(
    codes: &Tensor,
    params: &Tensor,
    g_idx: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    codes.contiguous()?.apply_op3_no_bwd(
        &params.contiguous()?,
        &g_idx.to_dtype(DType::U32)?.contiguous()?,
        &Dequantize { dtype },
    )
}

/// How a GPTQ projection multiplies on a GPU: `Fused` multiplies straight from the codes
/// (`gptq_matmul_*`: each step of 32 input columns dequantized into shared memory, then
/// tensor cores; no (out, in) weight in device memory), `Dequantize` writes the weight in
/// one pass and runs cuBLAS's product. `ARENAFLOW_GPTQ_MATMUL=fused` or `dequantize`
/// chooses; by default the fused kernel takes the products it was measured to win.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPath {
    Fused,
    Dequantize,
}

/// The products the fused kernel takes by default: at most `FUSED_MAX_ROWS` rows (tokens)
/// into at least `FUSED_MIN_OUT` outputs. On an H200 (`cuda_gptq_fused_matmul_timings`,
/// bf16, Gemma-2-9B's MLP) it took 0.70-0.74x the time of dequantize + cuBLAS at 1-64 rows
/// into 14,336 outputs (the codes read once instead of the weight written and read),
/// 1.02x at 256 and 2.8-6.8x from 1,024 rows on (cuBLAS's products are faster); into 3,584
/// outputs it was 2.7-8.3x slower at every row count (28 output tiles of 128 leave most of
/// the 132 SMs idle: it splits no k).
pub const FUSED_MAX_ROWS: usize = 64;
/// See [`FUSED_MAX_ROWS`].
pub const FUSED_MIN_OUT: usize = 14336;

/// The path a product of `rows` rows in `dtype` on `device` from `inp` input columns into
/// `out` outputs takes.
pub fn matmul_path(
    device: &candle_core::Device,
    dtype: DType,
    rows: usize,
    (out, inp): (usize, usize),
) -> MatmulPath {
    let possible =
        device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16) && inp.is_multiple_of(32);
    match std::env::var("ARENAFLOW_GPTQ_MATMUL").as_deref() {
        _ if !possible => MatmulPath::Dequantize,
        Ok("fused") => MatmulPath::Fused,
        Ok("dequantize") => MatmulPath::Dequantize,
        _ if rows <= FUSED_MAX_ROWS && out >= FUSED_MIN_OUT => MatmulPath::Fused,
        _ => MatmulPath::Dequantize,
    }
}

/// x (rows, in) times the GPTQ weight's transpose, (rows, out) in x's dtype, on the fused
/// kernel (see [`MatmulPath`]): x bf16 or f16 on a GPU, `in` a multiple of 32; the scales
/// and zeros stacked by [`params`]. No
/// gradient (the weight is frozen and the product is inference's).
pub fn fused_matmul(x: &Tensor, codes: &Tensor, params: &Tensor, g_idx: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &codes.contiguous()?,
        &params.contiguous()?,
        &FusedMatmul {
            g_idx: g_idx.to_dtype(DType::U32)?.contiguous()?,
        },
    )
}

/// The fused product's op: x (rows, in), codes (out, in) u8, params (2, groups, out) f32;
/// g_idx (in) u32 rides along.
struct FusedMatmul {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    g_idx: Tensor,
}

impl CustomOp3 for FusedMatmul {
    fn name(&self) -> &'static str {
        "arenaflow-gptq-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("gptq matmul: the fused kernel runs on a GPU only (matmul_path)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (g, gl) = self.g_idx.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g else {
            candle_core::bail!("gptq matmul: g_idx is not on the GPU");
        };
        let dev = x.device.clone();
        match x.dtype() {
            DType::BF16 => self.launch::<half::bf16>(&dev, (x, xl), (c, cl), (p, pl), (g, gl)),
            DType::F16 => self.launch::<half::f16>(&dev, (x, xl), (c, cl), (p, pl), (g, gl)),
            other => candle_core::bail!("gptq matmul: x in {other:?}, not bf16 or f16"),
        }
    }
}

#[cfg(feature = "cuda")]
impl FusedMatmul {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (x, xl): (&candle_core::CudaStorage, &Layout),
        (c, cl): (&candle_core::CudaStorage, &Layout),
        (p, pl): (&candle_core::CudaStorage, &Layout),
        (g, gl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{launch, suffix, view, GPTQ};
        let (out, inp, groups) = Dequantize::dims(cl, pl, gl)?;
        let (rows, xin) = xl.shape().dims2()?;
        let aligned = xl.start_offset().is_multiple_of(8) && cl.start_offset().is_multiple_of(16);
        if xin != inp || inp % 32 != 0 || p.dtype() != DType::F32 || !aligned {
            candle_core::bail!(
                "gptq matmul: x {:?} against codes {:?} (in a multiple of 32, rows 16-byte \
                 aligned), params in {:?}",
                xl.shape(),
                cl.shape(),
                p.dtype()
            );
        }
        let (xv, cv, pv, gv) = (
            view!(x, xl, T),
            view!(c, cl, u8),
            view!(p, pl, f32),
            view!(g, gl, u32),
        );
        // SAFETY: every (row, out) element is written by the block of its tile.
        let y = unsafe { dev.alloc::<T>(rows * out) }?;
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (out.div_ceil(128) as u32, rows.div_ceil(128) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m, n, k, gs) = (rows as u32, out as u32, inp as u32, groups as u32);
        // SAFETY: gptq_matmul_* take (x, codes, params, g_idx, y, m, n, k, groups): x
        // (m, k) and y (m, n) in T, codes (n, k), params 2 x groups x n, g_idx k, k a
        // multiple of 32 and every row 16-byte aligned for its 16-byte loads (both checked
        // above).
        launch!(dev, GPTQ, format!("gptq_matmul_{}", suffix(x.dtype())?), cfg;
            &xv, &cv, &pv, &gv, &y, &m, &n, &k, &gs);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((rows, out)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SplitMix64;
    use candle_core::Device;

    /// The op against the arithmetic composed from candle's ops in f32 (the path it
    /// replaced, the scales kept exact), bit for bit, in every dtype, with act-order's
    /// scattered groups.
    #[test]
    fn cpu_side_is_the_composed_arithmetic_bit_for_bit() {
        let (out, inp, groups) = (24, 64, 4);
        let mut rng = SplitMix64::new(5);
        let codes: Vec<u8> = (0..out * inp)
            .map(|_| (rng.next_u64() % 256) as u8)
            .collect();
        let scales: Vec<f32> = (0..groups * out)
            .map(|_| 1e-3 * (1.0 + rng.next_normal().abs()) as f32)
            .collect();
        let zeros: Vec<f32> = (0..groups * out)
            .map(|_| (rng.next_u64() % 256) as f32)
            .collect();
        let g_idx: Vec<u32> = (0..inp)
            .map(|_| (rng.next_u64() % groups as u64) as u32)
            .collect();
        let dev = Device::Cpu;
        let c = Tensor::from_slice(&codes, (out, inp), &dev).unwrap();
        let g = Tensor::from_slice(&g_idx, inp, &dev).unwrap();
        let s = Tensor::from_slice(&scales, (groups, out), &dev).unwrap();
        let z = Tensor::from_slice(&zeros, (groups, out), &dev).unwrap();
        let per_column = |t: &Tensor| t.index_select(&g, 0).unwrap().t().unwrap();
        let exact =
            ((c.to_dtype(DType::F32).unwrap() - per_column(&z)).unwrap() * per_column(&s)).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let composed = exact.to_dtype(dtype).unwrap();
            let fused = dequantize(&c, &s, &z, &g, dtype).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let bits = |t: &Tensor| -> Vec<u32> {
                crate::test_util::values(t)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert!(bits(&fused) == bits(&composed), "{dtype:?}");
        }
        let bad = Tensor::from_slice(&vec![groups as u32; inp], inp, &dev).unwrap();
        let error = dequantize(&c, &s, &s, &bad, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(error.contains("g_idx 4 of 4 groups"), "{error}");
    }
}
