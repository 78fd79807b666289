//! The end of a LoRA projection as one op, as PEFT computes it: `result + update * scaling`
//! with `result` the frozen projection's output in the model's dtype and `update` =
//! lora_B(lora_A(dropout(x))) in the adapter's f32. PyTorch promotes that sum to f32 and
//! PEFT casts it back to the model's dtype once, so the op rounds once:
//! out = T(f32(result) + f32(update * scaling)). Composed, candle took three passes over
//! the output (scale, cast, add) and rounded the update to the model's dtype before the add.
//! Under autocast the update comes in the model's dtype (the adapter's matmuls run in it)
//! and PyTorch rounds the scaled update before the add: out = T(result + T(update *
//! scaling)), one pass where candle's ops took four (cast, scale, cast, add).
//! Backward: the result's gradient is the output's as it is; the update's is
//! f32(grad) * scaling (rounded to the update's dtype). The CUDA side is `kernels/lora.cu`;
//! the CPU side computes the same.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Element};

pub struct LoraAdd {
    pub scaling: f32,
}

impl LoraAdd {
    fn cpu<T: Element>(&self, result: &[T], update: &[f32]) -> Vec<T> {
        result
            .par_iter()
            .zip(update.par_iter())
            .map(|(r, u)| T::from_f32(r.to_f32() + u * self.scaling))
            .collect()
    }

    /// Autocast's order: the scaled update rounded to T, then the sum rounded.
    fn cpu_rounded<T: Element>(&self, result: &[T], update: &[T]) -> Vec<T> {
        result
            .par_iter()
            .zip(update.par_iter())
            .map(|(r, u)| {
                let scaled = T::from_f32(u.to_f32() * self.scaling).to_f32();
                T::from_f32(r.to_f32() + scaled)
            })
            .collect()
    }
}

impl CustomOp2 for LoraAdd {
    fn name(&self) -> &'static str {
        "arenaflow-lora-add"
    }

    fn cpu_fwd(
        &self,
        r: &CpuStorage,
        rl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if rl.shape() != ul.shape() {
            candle_core::bail!(
                "lora_add: result {:?} vs update {:?}",
                rl.shape(),
                ul.shape()
            );
        }
        let (rw, uw) = ("lora_add: result", "lora_add: update");
        let out = match (r, u) {
            (CpuStorage::F32(r), CpuStorage::F32(u)) => {
                CpuStorage::F32(self.cpu(contiguous(r, rl, rw)?, contiguous(u, ul, uw)?))
            }
            (CpuStorage::BF16(r), CpuStorage::F32(u)) => {
                CpuStorage::BF16(self.cpu(contiguous(r, rl, rw)?, contiguous(u, ul, uw)?))
            }
            (CpuStorage::F16(r), CpuStorage::F32(u)) => {
                CpuStorage::F16(self.cpu(contiguous(r, rl, rw)?, contiguous(u, ul, uw)?))
            }
            (CpuStorage::BF16(r), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(self.cpu_rounded(contiguous(r, rl, rw)?, contiguous(u, ul, uw)?))
            }
            (CpuStorage::F16(r), CpuStorage::F16(u)) => {
                CpuStorage::F16(self.cpu_rounded(contiguous(r, rl, rw)?, contiguous(u, ul, uw)?))
            }
            (r, u) => candle_core::bail!(
                "lora_add: the update is {:?}, not f32 or the result's {:?}",
                u.dtype(),
                r.dtype()
            ),
        };
        Ok((out, rl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "lora_add",
            r.dtype(),
            &r.device.clone(),
            (r, rl),
            (u, ul)
        )
    }

    fn bwd(
        &self,
        _result: &Tensor,
        update: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let update = grad.contiguous()?.apply_op1_no_bwd(&Scaled {
            scaling: self.scaling,
            to_f32: update.dtype() == DType::F32,
        })?;
        Ok((Some(grad.clone()), Some(update)))
    }
}

#[cfg(feature = "cuda")]
impl LoraAdd {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (r, rl): (&candle_core::CudaStorage, &Layout),
        (u, ul): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{fail, launch, suffix, view, LORA};
        if rl.shape() != ul.shape() {
            return Err(fail(format!(
                "lora_add: {:?} vs {:?}",
                rl.shape(),
                ul.shape()
            )));
        }
        let n = rl.shape().elem_count();
        let rv = view!(r, rl, T);
        // SAFETY: the grid-stride loop writes all n elements.
        let out = unsafe { dev.alloc::<T>(n) }?;
        let cfg = crate::cuda::grid_stride(n);
        let count = n as u64;
        if u.dtype() == DType::F32 {
            let uv = view!(u, ul, f32);
            // SAFETY: lora_add_* take (result, update, out, n, scaling), all n elements
            // long, the update f32.
            launch!(dev, LORA, format!("lora_add_{}", suffix(r.dtype())?), cfg;
                &rv, &uv, &out, &count, &self.scaling);
        } else if u.dtype() == r.dtype() {
            let uv = view!(u, ul, T);
            // SAFETY: lora_add_rounded_* take (result, update, out, n, scaling), all n
            // elements long and of one type.
            launch!(dev, LORA, format!("lora_add_rounded_{}", suffix(r.dtype())?), cfg;
                &rv, &uv, &out, &count, &self.scaling);
        } else {
            return Err(fail(format!(
                "lora_add: the update is {:?}, not f32 or the result's {:?}",
                u.dtype(),
                r.dtype()
            )));
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            rl.shape().clone(),
        ))
    }
}

/// The update's gradient in one pass: f32(grad) * scaling, in f32 (`to_f32`: the adapter's
/// f32 update) or rounded to the gradient's dtype (autocast's update). Composed, a cast and
/// a scaling (and a cast back) with temporaries between them.
pub struct Scaled {
    pub scaling: f32,
    pub to_f32: bool,
}

impl Scaled {
    fn cpu<T: Element, U: Element>(&self, x: &[T]) -> Vec<U> {
        x.par_iter()
            .map(|v| U::from_f32(v.to_f32() * self.scaling))
            .collect()
    }
}

impl candle_core::CustomOp1 for Scaled {
    fn name(&self) -> &'static str {
        "arenaflow-scaled"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = "scaled: input";
        let out = match (x, self.to_f32) {
            (CpuStorage::F32(x), _) => CpuStorage::F32(self.cpu(contiguous(x, xl, what)?)),
            (CpuStorage::BF16(x), true) => CpuStorage::F32(self.cpu(contiguous(x, xl, what)?)),
            (CpuStorage::F16(x), true) => CpuStorage::F32(self.cpu(contiguous(x, xl, what)?)),
            (CpuStorage::BF16(x), false) => CpuStorage::BF16(self.cpu(contiguous(x, xl, what)?)),
            (CpuStorage::F16(x), false) => CpuStorage::F16(self.cpu(contiguous(x, xl, what)?)),
            (x, _) => candle_core::bail!("scaled takes f32, bf16 or f16, not {:?}", x.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(self, "scaled", x.dtype(), &x.device.clone(), (x, xl))
    }
}

#[cfg(feature = "cuda")]
impl Scaled {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (x, xl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{launch, suffix, view, LORA};
        let n = xl.shape().elem_count();
        let xv = view!(x, xl, T);
        let cfg = crate::cuda::grid_stride(n);
        let count = n as u64;
        let dtype = suffix(x.dtype())?;
        let storage = if self.to_f32 || x.dtype() == DType::F32 {
            // SAFETY: the grid-stride loop writes all n elements.
            let out = unsafe { dev.alloc::<f32>(n) }?;
            // SAFETY: scaled_f32_* take (x, out, n, scaling), both n elements long.
            launch!(dev, LORA, format!("scaled_f32_{dtype}"), cfg;
                &xv, &out, &count, &self.scaling);
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        } else {
            // SAFETY: the grid-stride loop writes all n elements.
            let out = unsafe { dev.alloc::<T>(n) }?;
            // SAFETY: scaled_same_* take (x, out, n, scaling), both n elements of one type.
            launch!(dev, LORA, format!("scaled_same_{dtype}"), cfg;
                &xv, &out, &count, &self.scaling);
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        };
        Ok((storage, xl.shape().clone()))
    }
}

/// `result + update * scaling` in `result`'s dtype, rounded once (PEFT's order), for an f32
/// `update` of `result`'s shape; for an update in `result`'s bf16 or f16 (autocast), the
/// scaled update rounded first, as PyTorch does. Differentiable in both. An f64 update (the
/// f64 models of the gradient checks) takes candle's composed ops in that order.
pub fn lora_add(result: &Tensor, update: &Tensor, scaling: f64) -> Result<Tensor> {
    if update.dtype() == DType::F64 {
        return (result.to_dtype(DType::F64)? + (update * scaling)?)?.to_dtype(result.dtype());
    }
    result.contiguous()?.apply_op2(
        &update.contiguous()?,
        LoraAdd {
            scaling: scaling as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{draw, values};
    use crate::weights::SplitMix64;
    use candle_core::{Device, Var};

    /// Against PEFT's arithmetic written out element by element: the sum in f32 of the result
    /// and the scaled update, one rounding to the model's dtype; and the gradients of the
    /// op against candle's autograd of the same expression composed in f32.
    #[test]
    fn rounds_once_like_peft_and_differentiates() {
        let mut rng = SplitMix64::new(11);
        let (rows, cols, scaling) = (6, 40, 2.0f64);
        let r32 = draw(&mut rng, (rows, cols), 3.0);
        let u = draw(&mut rng, (rows, cols), 0.01);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let r = r32.to_dtype(dtype).unwrap();
            let got = lora_add(&r, &u, scaling).unwrap();
            assert_eq!(got.dtype(), dtype);
            let want = (r.to_dtype(DType::F32).unwrap() + (&u * scaling).unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            assert_eq!(
                values(&got),
                values(&want),
                "{dtype:?}: one rounding of the f32 sum"
            );
        }
        // bf16: the old composed order rounded the update first; the two differ on some
        // elements, which is what the op is for.
        let r = r32.to_dtype(DType::BF16).unwrap();
        let twice = (&r + (&u * scaling).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
        let once = lora_add(&r, &u, scaling).unwrap();
        let differ = (twice.to_dtype(DType::F32).unwrap() - once.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(differ > 0.0, "the fixture should tell the two orders apart");

        // Gradients: d/d result = upstream, d/d update = scaling * upstream (f32 here).
        let rv = Var::from_tensor(&r32).unwrap();
        let uv = Var::from_tensor(&u).unwrap();
        let w = draw(&mut rng, (rows, cols), 1.0);
        let out = lora_add(rv.as_tensor(), uv.as_tensor(), scaling).unwrap();
        let grads = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let composed = ((rv.as_tensor() + (uv.as_tensor() * scaling).unwrap()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&rv, &uv] {
            assert_eq!(
                values(grads.get(v.as_tensor()).unwrap()),
                values(composed.get(v.as_tensor()).unwrap())
            );
        }
    }

    /// Autocast's update in the model's dtype: the op gives candle's composed autocast
    /// arithmetic (scale in f32, round, add) bit for bit, and its gradients too.
    #[test]
    fn rounds_the_scaled_update_first_under_autocast() {
        let mut rng = SplitMix64::new(12);
        let (rows, cols, scaling) = (5, 48, 16.0f64 / 12.0);
        let r32 = draw(&mut rng, (rows, cols), 3.0);
        let u32_ = draw(&mut rng, (rows, cols), 0.05);
        let w = draw(&mut rng, (rows, cols), 1.0);
        for dtype in [DType::BF16, DType::F16] {
            let rv = Var::from_tensor(&r32.to_dtype(dtype).unwrap()).unwrap();
            let uv = Var::from_tensor(&u32_.to_dtype(dtype).unwrap()).unwrap();
            let composed = |r: &Tensor, u: &Tensor| {
                let scaled = (u.to_dtype(DType::F32).unwrap() * scaling)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                (r + scaled).unwrap()
            };
            let got = lora_add(rv.as_tensor(), uv.as_tensor(), scaling).unwrap();
            let want = composed(rv.as_tensor(), uv.as_tensor());
            assert_eq!(values(&got), values(&want), "{dtype:?}");
            let wt = w.to_dtype(dtype).unwrap();
            let g1 = (got * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&rv, &uv] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(a.dtype(), dtype);
                assert_eq!(values(a), values(b), "{dtype:?} gradient");
            }
        }
    }

    #[test]
    fn refuses_an_update_that_is_not_f32_or_not_the_same_shape() {
        let dev = Device::Cpu;
        let r = Tensor::zeros((2, 3), DType::BF16, &dev).unwrap();
        let e = lora_add(&r, &Tensor::zeros((2, 3), DType::F16, &dev).unwrap(), 1.0).unwrap_err();
        assert!(e.to_string().contains("not f32 or the result's"), "{e}");
        let e = lora_add(&r, &Tensor::zeros((3, 2), DType::F32, &dev).unwrap(), 1.0).unwrap_err();
        assert!(e.to_string().contains("vs update"), "{e}");
    }
}
