//! RMSNorm over the last axis with an f32 weight, as one op: statistics in f32, and
//! transformers' rounding. Llama: `T(T(x * r) * w)` (`w * x.to(dtype)`); Gemma: `T(x * r * w)`
//! with the stored weight already `1 + w`, all in f32. The CUDA side is
//! `kernels/rms_norm.cu`; the CPU side computes the same, row by row. The backward pass gives
//! the input's gradient only: the weight is frozen in LoRA training.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Element};

pub struct RmsNorm {
    pub eps: f32,
    /// The weight is Gemma's 1 + w, multiplied in f32.
    pub gemma: bool,
}

impl RmsNorm {
    /// The number of columns, checked against the weight.
    fn columns(&self, xl: &Layout, wl: &Layout) -> Result<usize> {
        let cols = *xl.shape().dims().last().unwrap_or(&0);
        if wl.shape().elem_count() != cols || cols == 0 {
            candle_core::bail!("rms_norm: weight {:?} for rows of {cols}", wl.shape());
        }
        Ok(cols)
    }

    fn cpu<T: Element>(&self, x: &[T], w: &[f32], cols: usize) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); x.len()];
        out.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .for_each(|(o, row)| {
                let sum: f32 = row.iter().map(|v| v.to_f32() * v.to_f32()).sum();
                let r = 1.0 / (sum / cols as f32 + self.eps).sqrt();
                for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
                    let normed = v.to_f32() * r;
                    *o = if self.gemma {
                        T::from_f32_saturating(normed * w)
                    } else {
                        T::from_f32(T::from_f32(normed).to_f32() * w)
                    };
                }
            });
        out
    }
}

/// dx of [`RmsNorm`] for x and dy (its output's gradient): r (w dy) - x r^3 sum(w dy x) / cols.
struct RmsNormBackward {
    eps: f32,
    weight: Tensor,
}

impl RmsNormBackward {
    fn cpu<T: Element>(&self, x: &[T], dy: &[T], w: &[f32], cols: usize) -> Vec<T> {
        let mut dx = vec![T::from_f32(0.0); x.len()];
        dx.par_chunks_mut(cols)
            .zip(x.par_chunks(cols).zip(dy.par_chunks(cols)))
            .for_each(|(dx, (x, dy))| {
                let squares: f32 = x.iter().map(|v| v.to_f32() * v.to_f32()).sum();
                let dot: f32 = x
                    .iter()
                    .zip(dy)
                    .zip(w)
                    .map(|((v, g), w)| w * g.to_f32() * v.to_f32())
                    .sum();
                let r = 1.0 / (squares / cols as f32 + self.eps).sqrt();
                let k = r * r * r * dot / cols as f32;
                for (((o, v), g), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                    *o = T::from_f32(r * w * g.to_f32() - v.to_f32() * k);
                }
            });
        dx
    }

    fn cpu_weight(&self) -> Result<Vec<f32>> {
        self.weight.flatten_all()?.to_vec1::<f32>()
    }
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "arenaflow-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = *xl.shape().dims().last().unwrap_or(&0);
        if xl.shape() != dl.shape() || self.weight.elem_count() != cols {
            candle_core::bail!("rms_norm backward: x {:?}, dy {:?}", xl.shape(), dl.shape());
        }
        let w = self.cpu_weight()?;
        let (xw, dw) = ("rms_norm backward: x", "rms_norm backward: dy");
        let dx = match (x, dy) {
            (CpuStorage::F32(x), CpuStorage::F32(d)) => {
                CpuStorage::F32(self.cpu(contiguous(x, xl, xw)?, contiguous(d, dl, dw)?, &w, cols))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(d)) => {
                CpuStorage::BF16(self.cpu(contiguous(x, xl, xw)?, contiguous(d, dl, dw)?, &w, cols))
            }
            (CpuStorage::F16(x), CpuStorage::F16(d)) => {
                CpuStorage::F16(self.cpu(contiguous(x, xl, xw)?, contiguous(d, dl, dw)?, &w, cols))
            }
            (x, d) => {
                candle_core::bail!("rms_norm backward: x {:?}, dy {:?}", x.dtype(), d.dtype())
            }
        };
        Ok((dx, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "rms_norm backward",
            x.dtype(),
            &x.device.clone(),
            (x, xl),
            (dy, dl)
        )
    }
}

#[cfg(feature = "cuda")]
impl RmsNormBackward {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (x, xl): (&candle_core::CudaStorage, &Layout),
        (dy, dl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{fail, launch, suffix, view, RMS_NORM};
        let cols = *xl.shape().dims().last().unwrap_or(&0);
        if xl.shape() != dl.shape() || self.weight.elem_count() != cols || cols == 0 {
            return Err(fail(format!(
                "rms_norm backward: x {:?}, dy {:?}",
                xl.shape(),
                dl.shape()
            )));
        }
        let rows = xl.shape().elem_count() / cols;
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            return Err(fail(
                "rms_norm backward: the weight must be on the GPU".into(),
            ));
        };
        let (xv, dv, wv) = (view!(x, xl, T), view!(dy, dl, T), view!(ws, wl, f32));
        // SAFETY: one block per row writes every column of its row.
        let dx = unsafe { dev.alloc::<T>(rows * cols) }?;
        let cfg = crate::cuda::per_row(rows);
        let c = cols as i32;
        // SAFETY: rms_norm_backward_* take (x, dy, w, dx, cols, eps); x, dy and dx are rows x
        // cols, w cols.
        launch!(dev, RMS_NORM, format!("rms_norm_backward_{}", suffix(x.dtype())?), cfg;
            &xv, &dv, &wv, &dx, &c, &self.eps);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            xl.shape().clone(),
        ))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "arenaflow-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = self.columns(xl, wl)?;
        let CpuStorage::F32(w) = w else {
            candle_core::bail!("rms_norm: the weight must be f32, not {:?}", w.dtype());
        };
        let w = contiguous(w, wl, "rms_norm: weight")?;
        let out = match x {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.cpu(contiguous(x, xl, "rms_norm: x")?, w, cols))
            }
            CpuStorage::BF16(x) => {
                CpuStorage::BF16(self.cpu(contiguous(x, xl, "rms_norm: x")?, w, cols))
            }
            CpuStorage::F16(x) => {
                CpuStorage::F16(self.cpu(contiguous(x, xl, "rms_norm: x")?, w, cols))
            }
            other => candle_core::bail!("rms_norm takes f32, bf16 or f16, not {:?}", other.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    /// The input's gradient; none for the (frozen) weight.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &RmsNormBackward {
                eps: self.eps,
                weight: w.clone(),
            },
        )?;
        Ok((Some(dx), None))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "rms_norm",
            x.dtype(),
            &x.device.clone(),
            (x, xl),
            (w, wl)
        )
    }
}

#[cfg(feature = "cuda")]
impl RmsNorm {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (x, xl): (&candle_core::CudaStorage, &Layout),
        (w, wl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{launch, suffix, view, RMS_NORM};
        let cols = self.columns(xl, wl)?;
        let rows = xl.shape().elem_count() / cols;
        let (xv, wv) = (view!(x, xl, T), view!(w, wl, f32));
        // SAFETY: one block per row writes every column of its row.
        let out = unsafe { dev.alloc::<T>(rows * cols) }?;
        let cfg = crate::cuda::per_row(rows);
        let (c, gemma) = (cols as i32, self.gemma as i32);
        // SAFETY: rms_norm_* take (x, w, out, cols, eps, gemma); x and out are rows x cols.
        launch!(dev, RMS_NORM, format!("rms_norm_{}", suffix(x.dtype())?), cfg;
            &xv, &wv, &out, &c, &self.eps, &gemma);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            xl.shape().clone(),
        ))
    }
}

/// RMSNorm of `x` over its last axis with `weight` (taken in f32); differentiable in `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32, gemma: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &weight.to_dtype(DType::F32)?.contiguous()?,
        RmsNorm { eps, gemma },
    )
}

/// The residual add and the RMSNorm after it as one pass on a GPU (`add_rms_norm_*`): a and
/// b in, (2, ..) out: T(a + b) (in f32, saturating in f16) and [`RmsNorm`] of it, the
/// bits of the composed add and norm. Inference only: no backward.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AddRmsNorm {
    eps: f32,
    gemma: bool,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "arenaflow-add-rms-norm"
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
        candle_core::bail!(
            "add_rms_norm: one pass on a GPU only; the CPU composes the add and the norm"
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "add_rms_norm",
            a.dtype(),
            &a.device.clone(),
            (a, al),
            (b, bl),
            (w, wl)
        )
    }
}

#[cfg(feature = "cuda")]
impl AddRmsNorm {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (a, al): (&candle_core::CudaStorage, &Layout),
        (b, bl): (&candle_core::CudaStorage, &Layout),
        (w, wl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{launch, suffix, view, RMS_NORM};
        let norm = RmsNorm {
            eps: self.eps,
            gemma: self.gemma,
        };
        let cols = norm.columns(al, wl)?;
        if al.shape() != bl.shape() || a.dtype() != b.dtype() {
            candle_core::bail!("add_rms_norm: {:?} + {:?}", al.shape(), bl.shape());
        }
        let rows = al.shape().elem_count() / cols;
        let (av, bv, wv) = (view!(a, al, T), view!(b, bl, T), view!(w, wl, f32));
        // SAFETY: one block per row writes every column of its row in both halves.
        let both = unsafe { dev.alloc::<T>(2 * rows * cols) }?;
        let cfg = crate::cuda::per_row(rows);
        let (c, gemma) = (cols as i32, self.gemma as i32);
        // SAFETY: add_rms_norm_* take (a, b, w, both, cols, eps, gemma); a and b are rows x
        // cols, both 2 x rows x cols (rows = the grid), w cols.
        launch!(dev, RMS_NORM, format!("add_rms_norm_{}", suffix(a.dtype())?), cfg;
            &av, &bv, &wv, &both, &c, &self.eps, &gemma);
        let mut dims = vec![2];
        dims.extend_from_slice(al.shape().dims());
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(both, dev.clone()),
            Shape::from(dims),
        ))
    }
}

/// `a + b` and the RMSNorm of it with `weight` (taken in f32) in one pass on a GPU: the
/// composed add's and [`rms_norm`]'s bits. No gradient.
pub fn add_rms_norm(
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    eps: f32,
    gemma: bool,
) -> Result<(Tensor, Tensor)> {
    let both = a.contiguous()?.apply_op3_no_bwd(
        &b.contiguous()?,
        &weight.to_dtype(DType::F32)?.contiguous()?,
        &AddRmsNorm { eps, gemma },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SplitMix64;
    use candle_core::Device;

    /// RMSNorm of one row from the definition, in f64, with the two styles' weight.
    fn reference(row: &[f32], w: &[f32], eps: f64) -> Vec<f64> {
        let mean = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / row.len() as f64;
        let r = 1.0 / (mean + eps).sqrt();
        row.iter()
            .zip(w)
            .map(|(&x, &w)| x as f64 * r * w as f64)
            .collect()
    }

    #[test]
    fn cpu_side_matches_the_definition() {
        let (rows, cols, eps) = (5, 96, 1e-6);
        let mut rng = SplitMix64::new(3);
        let x: Vec<f32> = (0..rows * cols)
            .map(|_| 3.0 * rng.next_normal() as f32)
            .collect();
        let w: Vec<f32> = (0..cols)
            .map(|_| 1.0 + 0.1 * rng.next_normal() as f32)
            .collect();
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(&x, (rows, cols), &dev).unwrap();
        let wt = Tensor::from_slice(&w, cols, &dev).unwrap();
        for (dtype, bar) in [
            (DType::F32, 1e-5),
            (DType::BF16, 1.6e-2),
            (DType::F16, 2e-3),
        ] {
            for gemma in [false, true] {
                let out = rms_norm(&xt.to_dtype(dtype).unwrap(), &wt, eps as f32, gemma)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                // The input as the op saw it: rounded to the dtype.
                let seen = xt.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let seen = seen.to_vec2::<f32>().unwrap();
                for (got, row) in out.iter().zip(&seen) {
                    for (g, want) in got.iter().zip(reference(row, &w, eps)) {
                        let err = (*g as f64 - want).abs() / want.abs().max(1.0);
                        assert!(err < bar, "{dtype:?} gemma {gemma}: {g} vs {want}");
                    }
                }
            }
        }
    }

    /// Gemma's f16 output saturates at f16's largest finite value (Llama's weight is applied
    /// in the model's dtype, as transformers does, and is not guarded).
    #[test]
    fn gemma_f16_saturates_instead_of_overflowing() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, -1.0, 1.0, -1.0]], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let w = Tensor::new(&[1e5f32, 1e5, 2.0, 1.0], &dev).unwrap();
        let out = rms_norm(&x, &w, 1e-6, true)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(out[0][0], crate::ops::F16_MAX);
        assert_eq!(out[0][1], -crate::ops::F16_MAX);
        assert!((out[0][2] - 2.0).abs() < 1e-3 && (out[0][3] + 1.0).abs() < 1e-3);
    }

    /// The backward pass against autograd through the composed f64 definition.
    #[test]
    fn backward_matches_autograd() {
        let (rows, cols, eps) = (4, 80, 1e-6);
        let mut rng = SplitMix64::new(9);
        let mut values =
            |n: usize, s: f64| -> Vec<f64> { (0..n).map(|_| s * rng.next_normal()).collect() };
        let (x, w, u) = (
            values(rows * cols, 2.0),
            values(cols, 0.3),
            values(rows * cols, 1.0),
        );
        let dev = Device::Cpu;
        let xt =
            candle_core::Var::from_tensor(&Tensor::from_slice(&x, (rows, cols), &dev).unwrap())
                .unwrap();
        let wt = (Tensor::from_slice(&w, cols, &dev).unwrap() + 1.0).unwrap();
        let ut = Tensor::from_slice(&u, (rows, cols), &dev).unwrap();
        let composed = {
            let x = xt.as_tensor();
            let r = (x.sqr().unwrap().mean_keepdim(1).unwrap() + eps)
                .unwrap()
                .sqrt()
                .unwrap();
            x.broadcast_div(&r).unwrap().broadcast_mul(&wt).unwrap()
        };
        let grad = |y: &Tensor| {
            let store = (y * &ut).unwrap().sum_all().unwrap().backward().unwrap();
            store
                .get(xt.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let want = grad(&composed);
        // The op in f32 (its CPU side takes f32, bf16 or f16 inputs).
        let x32 =
            candle_core::Var::from_tensor(&xt.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let y = rms_norm(x32.as_tensor(), &wt, eps as f32, true).unwrap();
        let store = (y * ut.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = store.get(x32.as_tensor()).unwrap();
        let err = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err / scale < 1e-5, "max |diff| {err} against {scale}");
    }
}
