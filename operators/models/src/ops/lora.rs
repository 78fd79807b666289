//! The end of a LoRA projection as one op, as PEFT computes it: `result + update * scaling`
//! with `result` the frozen projection's output in the model's dtype and `update` =
//! lora_B(lora_A(dropout(x))) in the adapter's f32. PyTorch promotes that sum to f32 and
//! PEFT casts it back to the model's dtype once, so the op rounds once:
//! out = T(f32(result) + f32(update * scaling)). Composed, candle took three passes over
//! the output (scale, cast, add) and rounded the update to the model's dtype before the add.
//! Backward: the result's gradient is the output's as it is; the update's is
//! f32(grad) * scaling. The CUDA side is `kernels/lora.cu`; the CPU side computes the same.

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
        let CpuStorage::F32(u) = u else {
            candle_core::bail!("lora_add: the update is {:?}, not f32", u.dtype());
        };
        let u = contiguous(u, ul, "lora_add: update")?;
        let rw = "lora_add: result";
        let out = match r {
            CpuStorage::F32(r) => CpuStorage::F32(self.cpu(contiguous(r, rl, rw)?, u)),
            CpuStorage::BF16(r) => CpuStorage::BF16(self.cpu(contiguous(r, rl, rw)?, u)),
            CpuStorage::F16(r) => CpuStorage::F16(self.cpu(contiguous(r, rl, rw)?, u)),
            r => candle_core::bail!("lora_add: the result is {:?}", r.dtype()),
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
        _update: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let update = grad.contiguous()?.apply_op1_no_bwd(&ScaledF32 {
            scaling: self.scaling,
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
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        if rl.shape() != ul.shape() {
            return Err(fail(format!(
                "lora_add: {:?} vs {:?}",
                rl.shape(),
                ul.shape()
            )));
        }
        if u.dtype() != DType::F32 {
            return Err(fail(format!(
                "lora_add: the update is {:?}, not f32",
                u.dtype()
            )));
        }
        let n = rl.shape().elem_count();
        let (rv, uv) = (view!(r, rl, T), view!(u, ul, f32));
        // SAFETY: the grid-stride loop writes all n elements.
        let out = unsafe { dev.alloc::<T>(n) }?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = n as u64;
        // SAFETY: lora_add_* take (result, update, out, n, scaling), all n elements long.
        launch!(dev, LORA, format!("lora_add_{}", suffix(r.dtype())?), cfg;
            &rv, &uv, &out, &count, &self.scaling);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            rl.shape().clone(),
        ))
    }
}

/// The update's gradient: f32(grad) * scaling in one pass (composed, a cast and a scaling:
/// two passes and an f32 temporary of the output's size).
pub struct ScaledF32 {
    pub scaling: f32,
}

impl ScaledF32 {
    fn cpu<T: Element>(&self, x: &[T]) -> Vec<f32> {
        x.par_iter().map(|v| v.to_f32() * self.scaling).collect()
    }
}

impl candle_core::CustomOp1 for ScaledF32 {
    fn name(&self) -> &'static str {
        "arenaflow-scaled-f32"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = "scaled f32: input";
        let out = match x {
            CpuStorage::F32(x) => self.cpu(contiguous(x, xl, what)?),
            CpuStorage::BF16(x) => self.cpu(contiguous(x, xl, what)?),
            CpuStorage::F16(x) => self.cpu(contiguous(x, xl, what)?),
            x => candle_core::bail!("scaled f32 takes f32, bf16 or f16, not {:?}", x.dtype()),
        };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(self, "scaled_f32", x.dtype(), &x.device.clone(), (x, xl))
    }
}

#[cfg(feature = "cuda")]
impl ScaledF32 {
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
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let n = xl.shape().elem_count();
        let xv = view!(x, xl, T);
        // SAFETY: the grid-stride loop writes all n elements.
        let out = unsafe { dev.alloc::<f32>(n) }?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = n as u64;
        // SAFETY: scaled_f32_* take (x, out, n, scaling), both n elements long.
        launch!(dev, LORA, format!("scaled_f32_{}", suffix(x.dtype())?), cfg;
            &xv, &out, &count, &self.scaling);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            xl.shape().clone(),
        ))
    }
}

/// `result + update * scaling` in `result`'s dtype, rounded once (PEFT's order); `update` is
/// f32 of `result`'s shape. Differentiable in both. An f64 update (the f64 models of the
/// gradient checks) takes candle's composed ops in that order.
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

    #[test]
    fn refuses_an_update_that_is_not_f32_or_not_the_same_shape() {
        let dev = Device::Cpu;
        let r = Tensor::zeros((2, 3), DType::BF16, &dev).unwrap();
        let e = lora_add(&r, &Tensor::zeros((2, 3), DType::BF16, &dev).unwrap(), 1.0).unwrap_err();
        assert!(e.to_string().contains("not f32"), "{e}");
        let e = lora_add(&r, &Tensor::zeros((3, 2), DType::F32, &dev).unwrap(), 1.0).unwrap_err();
        assert!(e.to_string().contains("vs update"), "{e}");
    }
}
