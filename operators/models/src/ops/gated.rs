//! The gated activation of the MLP as one op, `act(gate) * up`, each step rounded to the
//! element type as PyTorch does it. The CUDA side is `kernels/gated.cu`; the CPU side
//! computes the same.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Element};

/// The activation applied to the gate; the discriminant is the kernels' `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Activation {
    Silu = 0,
    /// `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh = 1,
    /// `gelu`: the exact (erf) form.
    GeluErf = 2,
}

impl Activation {
    fn apply(self, g: f32) -> f32 {
        match self {
            Self::Silu => g / (1.0 + (-g).exp()),
            Self::GeluTanh => {
                let c = 0.797_884_6_f32; // sqrt(2 / pi)
                0.5 * g * (1.0 + (c * (g + 0.044715 * g * g * g)).tanh())
            }
            Self::GeluErf => {
                0.5 * g
                    * (1.0 + candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2))
            }
        }
    }
}

pub struct Gated {
    pub activation: Activation,
}

impl Gated {
    fn cpu<T: Element>(&self, gate: &[T], up: &[T]) -> Vec<T> {
        gate.par_iter()
            .zip(up.par_iter())
            .map(|(g, u)| {
                let a = T::from_f32(self.activation.apply(g.to_f32())).to_f32();
                T::from_f32(a * u.to_f32())
            })
            .collect()
    }
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "arenaflow-gated"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!("gated: gate {:?} vs up {:?}", gl.shape(), ul.shape());
        }
        let (gw, uw) = ("gated: gate", "gated: up");
        let out = match (g, u) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(self.cpu(contiguous(g, gl, gw)?, contiguous(u, ul, uw)?))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(self.cpu(contiguous(g, gl, gw)?, contiguous(u, ul, uw)?))
            }
            (CpuStorage::F16(g), CpuStorage::F16(u)) => {
                CpuStorage::F16(self.cpu(contiguous(g, gl, gw)?, contiguous(u, ul, uw)?))
            }
            (g, u) => candle_core::bail!(
                "gated takes f32, bf16 or f16 of one type, not {:?} and {:?}",
                g.dtype(),
                u.dtype()
            ),
        };
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "gated",
            g.dtype(),
            &g.device.clone(),
            (g, gl),
            (u, ul)
        )
    }
}

#[cfg(feature = "cuda")]
impl Gated {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (g, gl): (&candle_core::CudaStorage, &Layout),
        (u, ul): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{fail, launch, suffix, view, GATED};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        if gl.shape() != ul.shape() {
            return Err(fail(format!("gated: {:?} vs {:?}", gl.shape(), ul.shape())));
        }
        let n = gl.shape().elem_count();
        let (gv, uv) = (view!(g, gl, T), view!(u, ul, T));
        // SAFETY: the grid-stride loop writes all n elements.
        let out = unsafe { dev.alloc::<T>(n) }?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (count, kind) = (n as u64, self.activation as i32);
        // SAFETY: gated_* take (gate, up, out, n, kind), all n elements long.
        launch!(dev, GATED, format!("gated_{}", suffix(g.dtype())?), cfg;
            &gv, &uv, &out, &count, &kind);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            gl.shape().clone(),
        ))
    }
}

/// `activation(gate) * up`, elementwise.
pub fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &Gated { activation })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SplitMix64;
    use candle_core::{DType, Device};

    #[test]
    fn cpu_side_matches_candles_composed_ops() {
        let mut rng = SplitMix64::new(5);
        let n = 4 * 384;
        let g: Vec<f32> = (0..n).map(|_| 4.0 * rng.next_normal() as f32).collect();
        let u: Vec<f32> = (0..n).map(|_| rng.next_normal() as f32).collect();
        let dev = Device::Cpu;
        let gt = Tensor::from_slice(&g, (4, 384), &dev).unwrap();
        let ut = Tensor::from_slice(&u, (4, 384), &dev).unwrap();
        for activation in [Activation::Silu, Activation::GeluTanh, Activation::GeluErf] {
            for (dtype, bar) in [
                (DType::F32, 1e-5f32),
                (DType::BF16, 2e-2),
                (DType::F16, 2e-3),
            ] {
                let (g, u) = (gt.to_dtype(dtype).unwrap(), ut.to_dtype(dtype).unwrap());
                let act = match activation {
                    Activation::Silu => candle_nn::ops::silu(&g).unwrap(),
                    Activation::GeluTanh => g.gelu().unwrap(),
                    Activation::GeluErf => g.gelu_erf().unwrap(),
                };
                let want = (act * &u).unwrap().to_dtype(DType::F32).unwrap();
                let got = gated(&g, &u, activation)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let worst = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .broadcast_div(&(want.abs().unwrap() + 1.0).unwrap())
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    worst < bar,
                    "{activation:?} {dtype:?}: worst relative error {worst}"
                );
            }
        }
    }
}
