//! Seeding a backward pass with a given output gradient: the gradient checkpointing's
//! vector-Jacobian product of one layer (d/dθ of Σ out ⊙ upstream) without forming the
//! product. `seeded(out, upstream)` is a scalar whose backward hands `upstream` to `out` as
//! its gradient as it is; composed, `(out * upstream).sum_all()` took a product and a sum in
//! the forward and, in the backward, a tensor of ones of the output's size and another
//! product (the same gradient: 1 * upstream = upstream).

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct Seed;

impl CustomOp2 for Seed {
    fn name(&self) -> &'static str {
        "arenaflow-seed"
    }

    fn cpu_fwd(
        &self,
        _out: &CpuStorage,
        ol: &Layout,
        _upstream: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(ol, ul)?;
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &candle_core::CudaStorage,
        ol: &Layout,
        _upstream: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check(ol, ul)?;
        let dev = out.device().clone();
        let zero = dev.alloc_zeros::<f32>(1)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(zero, dev),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        _out: &Tensor,
        upstream: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(upstream.clone()), None))
    }
}

fn check(ol: &Layout, ul: &Layout) -> Result<()> {
    if ol.shape() != ul.shape() {
        candle_core::bail!(
            "seed: output {:?} vs its gradient {:?}",
            ol.shape(),
            ul.shape()
        );
    }
    Ok(())
}

/// A scalar (zero, f32) whose `backward()` gives `out` the gradient `upstream` (of `out`'s
/// shape and dtype, detached) and the rest of `out`'s graph what follows from it: the
/// gradients of Σ out ⊙ upstream, without computing it.
pub fn seeded(out: &Tensor, upstream: &Tensor) -> Result<Tensor> {
    if out.dtype() != upstream.dtype() {
        candle_core::bail!(
            "seed: output {:?} vs its gradient {:?}",
            out.dtype(),
            upstream.dtype()
        );
    }
    out.apply_op2(&upstream.detach(), Seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{draw, values};
    use crate::weights::SplitMix64;
    use candle_core::{DType, Device, Var};

    /// The gradients of a small graph seeded with `upstream` equal those of the composed
    /// Σ out ⊙ upstream, in f32 and bf16; a gradient of another shape is refused.
    #[test]
    fn gives_the_gradients_of_the_product_sum() {
        let mut rng = SplitMix64::new(21);
        let w32 = draw(&mut rng, (8, 5), 1.0);
        let x32 = draw(&mut rng, (3, 8), 1.0);
        let up32 = draw(&mut rng, (3, 5), 1.0);
        for dtype in [DType::F32, DType::BF16] {
            let w = Var::from_tensor(&w32.to_dtype(dtype).unwrap()).unwrap();
            let x = x32.to_dtype(dtype).unwrap();
            let up = up32.to_dtype(dtype).unwrap();
            let out = || x.matmul(w.as_tensor()).unwrap().tanh().unwrap();
            let composed = (out() * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let seeded = seeded(&out(), &up).unwrap().backward().unwrap();
            assert_eq!(
                values(seeded.get(w.as_tensor()).unwrap()),
                values(composed.get(w.as_tensor()).unwrap()),
                "{dtype:?}"
            );
        }
        let e = seeded(
            &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("vs its gradient"), "{e}");
    }
}
