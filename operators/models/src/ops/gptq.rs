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
    let params = Tensor::stack(
        &[scales.to_dtype(DType::F32)?, zeros.to_dtype(DType::F32)?],
        0,
    )?;
    codes.contiguous()?.apply_op3_no_bwd(
        &params.contiguous()?,
        &g_idx.to_dtype(DType::U32)?.contiguous()?,
        &Dequantize { dtype },
    )
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
