//! Inverted dropout on a GPU as one op with a stateless mask (`kernels/dropout.cu`): element
//! i is kept when a hash of (seed, i) falls at or above p, so the backward pass multiplies
//! the gradient by the same mask drawn again from the seed, nothing is stored, and no random
//! generator is re-seeded per call (cuRAND's re-seeding cost more than the layer). The CPU
//! draws its masks in `layers/dropout.rs`.

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

pub struct Dropout {
    pub seed: u64,
    pub p: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "arenaflow-dropout"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("arenaflow-dropout runs on a GPU; the CPU draws its masks itself")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(self, "dropout", x.dtype(), &x.device.clone(), (x, layout))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dropout(grad, self.seed, self.p)?))
    }
}

#[cfg(feature = "cuda")]
impl Dropout {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (x, layout): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{launch, suffix, view, DROPOUT};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let xv = view!(x, layout, T);
        let n = layout.shape().elem_count();
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n) }?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale = 1.0 / (1.0 - self.p);
        // SAFETY: dropout_* take (x, out, n, seed, p, scale) over n contiguous elements.
        launch!(dev, DROPOUT, format!("dropout_{}", suffix(x.dtype())?), cfg;
            &xv, &out, &n, &self.seed, &self.p, &scale);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            layout.shape().clone(),
        ))
    }
}

/// `x` with each element zeroed with probability `p` (the mask a function of `seed`) and the
/// rest scaled by 1 / (1 - p); differentiable.
pub fn dropout(x: &Tensor, seed: u64, p: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout { seed, p })
}
