//! The gated activation of the MLP as one op, `act(gate) * up`, each step rounded to the
//! element type as PyTorch does it, and its backward pass as one op: both gradients in one
//! pass over gate, up and the output's gradient, rounded where PyTorch's autograd rounds
//! (candle's composed backward took about ten passes: the activation's derivative built
//! from exp, neg, recip and mul, then the products and their sums). The CUDA side is
//! `kernels/gated.cu`; the CPU side computes the same.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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

    /// The derivative at `g`, as PyTorch's `silu_backward` and `gelu_backward` compute it.
    fn slope(self, g: f32) -> f32 {
        match self {
            Self::Silu => {
                let sig = 1.0 / (1.0 + (-g).exp());
                sig * (1.0 + g * (1.0 - sig))
            }
            Self::GeluTanh => {
                let (beta, kappa) = (0.797_884_6_f32, 0.044715f32);
                let th = (beta * (g + kappa * g * g * g)).tanh();
                0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * beta * (1.0 + 3.0 * kappa * g * g)
            }
            Self::GeluErf => {
                let alpha = 0.398_942_3_f32; // 1 / sqrt(2 pi)
                0.5 * (1.0 + candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2))
                    + g * (-0.5 * g * g).exp() * alpha
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

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(
            up,
            &grad.contiguous()?,
            &GatedBackward {
                activation: self.activation,
            },
        )?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
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
        if gl.shape() != ul.shape() {
            return Err(fail(format!("gated: {:?} vs {:?}", gl.shape(), ul.shape())));
        }
        let n = gl.shape().elem_count();
        let (gv, uv) = (view!(g, gl, T), view!(u, ul, T));
        // SAFETY: the grid-stride loop writes all n elements.
        let out = unsafe { dev.alloc::<T>(n) }?;
        let cfg = crate::cuda::grid_stride(n);
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

/// [`gated`] for training: its backward is [`GatedBackward`]'s one pass.
pub fn gated_t(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Gated { activation })
}

/// The gradients of gate and up from the output's, stacked: (2, ..gate's shape), d_gate
/// first. With a = round(act(gate)): d_up = round(grad * a) and d_gate = round(round(grad
/// * up) * act'(gate)), PyTorch's roundings for `act(gate) * up` in the element type.
pub struct GatedBackward {
    pub activation: Activation,
}

impl GatedBackward {
    fn cpu<T: Element>(&self, gate: &[T], up: &[T], grad: &[T]) -> Vec<T> {
        let n = gate.len();
        let mut out = vec![T::from_f32(0.0); 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        d_gate
            .par_iter_mut()
            .zip(d_up.par_iter_mut())
            .zip(gate.par_iter().zip(up.par_iter()).zip(grad.par_iter()))
            .for_each(|((dg, du), ((g, u), dy))| {
                let (g, dy) = (g.to_f32(), dy.to_f32());
                let a = T::from_f32(self.activation.apply(g)).to_f32();
                let da = T::from_f32(dy * u.to_f32()).to_f32();
                *dg = T::from_f32(da * self.activation.slope(g));
                *du = T::from_f32(dy * a);
            });
        out
    }
}

impl CustomOp3 for GatedBackward {
    fn name(&self) -> &'static str {
        "arenaflow-gated-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        d: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() || gl.shape() != dl.shape() {
            candle_core::bail!(
                "gated backward: gate {:?}, up {:?}, grad {:?}",
                gl.shape(),
                ul.shape(),
                dl.shape()
            );
        }
        let (gw, uw, dw) = (
            "gated backward: gate",
            "gated backward: up",
            "gated backward: grad",
        );
        let out = match (g, u, d) {
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(d)) => {
                CpuStorage::F32(self.cpu(
                    contiguous(g, gl, gw)?,
                    contiguous(u, ul, uw)?,
                    contiguous(d, dl, dw)?,
                ))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u), CpuStorage::BF16(d)) => {
                CpuStorage::BF16(self.cpu(
                    contiguous(g, gl, gw)?,
                    contiguous(u, ul, uw)?,
                    contiguous(d, dl, dw)?,
                ))
            }
            (CpuStorage::F16(g), CpuStorage::F16(u), CpuStorage::F16(d)) => {
                CpuStorage::F16(self.cpu(
                    contiguous(g, gl, gw)?,
                    contiguous(u, ul, uw)?,
                    contiguous(d, dl, dw)?,
                ))
            }
            (g, u, d) => candle_core::bail!(
                "gated backward takes f32, bf16 or f16 of one type, not {:?}, {:?} and {:?}",
                g.dtype(),
                u.dtype(),
                d.dtype()
            ),
        };
        Ok((out, stacked(gl.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        d: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "gated backward",
            g.dtype(),
            &g.device.clone(),
            (g, gl),
            (u, ul),
            (d, dl)
        )
    }
}

/// (2, ..shape): the two gradients, one after the other.
fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    Shape::from(dims)
}

#[cfg(feature = "cuda")]
impl GatedBackward {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (g, gl): (&candle_core::CudaStorage, &Layout),
        (u, ul): (&candle_core::CudaStorage, &Layout),
        (d, dl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{fail, launch, suffix, view, GATED};
        if gl.shape() != ul.shape() || gl.shape() != dl.shape() {
            return Err(fail(format!(
                "gated backward: {:?}, {:?}, {:?}",
                gl.shape(),
                ul.shape(),
                dl.shape()
            )));
        }
        let n = gl.shape().elem_count();
        let (gv, uv, dv) = (view!(g, gl, T), view!(u, ul, T), view!(d, dl, T));
        // SAFETY: the grid-stride loop writes all 2n elements (i and n + i for each i < n).
        let out = unsafe { dev.alloc::<T>(2 * n) }?;
        let cfg = crate::cuda::grid_stride(n);
        let (count, kind) = (n as u64, self.activation as i32);
        // SAFETY: gated_backward_* take (gate, up, grad, out, n, kind): three inputs n long
        // and out 2n long.
        launch!(dev, GATED, format!("gated_backward_{}", suffix(g.dtype())?), cfg;
            &gv, &uv, &dv, &out, &count, &kind);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            stacked(gl.shape()),
        ))
    }
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

    /// The one-pass backward against candle's composed autograd of `act(gate) * up`: f32
    /// to 1e-5 (relative to the largest gradient), bf16 and f16 near f32's within their
    /// rounding; and the gradients are the ones autograd reaches through `gated_t`.
    #[test]
    fn backward_matches_composed_autograd() {
        let mut rng = SplitMix64::new(9);
        let (rows, cols) = (6, 320);
        let draw = |rng: &mut SplitMix64, scale: f32| -> Vec<f32> {
            (0..rows * cols)
                .map(|_| scale * rng.next_normal() as f32)
                .collect()
        };
        let (g, u, dy) = (
            draw(&mut rng, 3.0),
            draw(&mut rng, 1.0),
            draw(&mut rng, 1.0),
        );
        let dev = Device::Cpu;
        let t = |v: &[f32]| Tensor::from_slice(v, (rows, cols), &dev).unwrap();
        let values = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let worst = |got: &[f32], want: &[f32]| {
            let norm = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            got.iter()
                .zip(want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / norm
        };
        for activation in [Activation::Silu, Activation::GeluTanh, Activation::GeluErf] {
            // candle's composed ops in f32, through its autograd.
            let (gv, uv) = (
                candle_core::Var::from_tensor(&t(&g)).unwrap(),
                candle_core::Var::from_tensor(&t(&u)).unwrap(),
            );
            let act = match activation {
                Activation::Silu => candle_nn::ops::silu(gv.as_tensor()).unwrap(),
                Activation::GeluTanh => gv.as_tensor().gelu().unwrap(),
                Activation::GeluErf => gv.as_tensor().gelu_erf().unwrap(),
            };
            let loss = (act * uv.as_tensor()).unwrap().mul(&t(&dy)).unwrap();
            let grads = loss.sum_all().unwrap().backward().unwrap();
            let want_g = values(grads.get(gv.as_tensor()).unwrap());
            let want_u = values(grads.get(uv.as_tensor()).unwrap());
            for (dtype, bar) in [
                (DType::F32, 1e-5f32),
                (DType::BF16, 2e-2),
                (DType::F16, 2e-3),
            ] {
                let (gv, uv) = (
                    candle_core::Var::from_tensor(&t(&g).to_dtype(dtype).unwrap()).unwrap(),
                    candle_core::Var::from_tensor(&t(&u).to_dtype(dtype).unwrap()).unwrap(),
                );
                let out = gated_t(gv.as_tensor(), uv.as_tensor(), activation).unwrap();
                let loss = out.mul(&t(&dy).to_dtype(dtype).unwrap()).unwrap();
                let grads = loss.sum_all().unwrap().backward().unwrap();
                let got_g = values(grads.get(gv.as_tensor()).unwrap());
                let got_u = values(grads.get(uv.as_tensor()).unwrap());
                let (eg, eu) = (worst(&got_g, &want_g), worst(&got_u, &want_u));
                assert!(
                    eg < bar && eu < bar,
                    "{activation:?} {dtype:?}: d_gate off by {eg}, d_up by {eu}"
                );
            }
        }
    }
}
