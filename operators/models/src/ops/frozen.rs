//! A frozen projection `x W^T` whose backward computes only the input's gradient.
//!
//! candle's autograd of `x.matmul(&w.t())` computes the gradient of both operands whatever
//! they are: for a frozen base weight that is a GEMM as large as the forward's over every
//! token (`x^T dY`), an all-zero tensor of W's size to add it into, and the result kept
//! until the backward pass ends (the model's size again for the whole model). As in PyTorch,
//! where a weight with `requires_grad=False` gets no gradient, this op's backward is
//! `dX = dY W` alone, the same GEMM in the same layout as candle's, so the input gradient is
//! the same to the bit. The forward is candle's own matmul on the storages (cuBLAS on CUDA).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenMatmulT;

/// A GEMM's (batch, m, n, k) as candle's storages take it.
type Bmnk = (usize, usize, usize, usize);

impl FrozenMatmulT {
    /// The GEMM's (batch, m, n, k), W^T's layout and the output's shape for x (m, k) and W
    /// (n, k).
    fn plan(xl: &Layout, wl: &Layout) -> Result<(Bmnk, Layout, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!(
                "frozen projection: input {:?} against weight {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        Ok(((1, m, n, k), wl.transpose(0, 1)?, Shape::from((m, n))))
    }
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "arenaflow-frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, wtl, shape) = Self::plan(xl, wl)?;
        Ok((x.matmul(w, bmnk, xl, &wtl)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, wtl, shape) = Self::plan(xl, wl)?;
        Ok((x.matmul(w, bmnk, xl, &wtl)?, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // candle's `grad.matmul(&rhs.t())` with rhs = W^T: the same call on W itself.
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x W^T` for x (m, k) and a frozen W (n, k): no gradient flows to W (see the module).
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.elem_count() == 0 || w.elem_count() == 0 {
        // candle's matmul makes the zeros of an empty product; nothing to save here.
        return x.matmul(&w.t()?);
    }
    x.apply_op2(w, FrozenMatmulT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{draw, values};
    use crate::weights::SplitMix64;
    use candle_core::{DType, Device, Var};

    /// The same bits as candle's `x.matmul(&w.t())` forward and input gradient, in f32 and
    /// bf16, and no gradient at all for the weight (a Var here, so candle's would have one).
    #[test]
    fn is_candles_matmul_without_the_weights_gradient() {
        let mut rng = SplitMix64::new(5);
        let (m, k, n) = (7, 24, 10);
        let (x32, w32, up32) = (
            draw(&mut rng, (m, k), 1.0),
            draw(&mut rng, (n, k), 1.0),
            draw(&mut rng, (m, n), 1.0),
        );
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&x32.to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&w32.to_dtype(dtype).unwrap()).unwrap();
            let up = up32.to_dtype(dtype).unwrap();
            let ours = frozen_matmul_t(x.as_tensor(), w.as_tensor()).unwrap();
            let theirs = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            assert_eq!(values(&ours), values(&theirs), "{dtype:?} forward");
            let g_ours = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(
                values(g_ours.get(x.as_tensor()).unwrap()),
                values(g_theirs.get(x.as_tensor()).unwrap()),
                "{dtype:?} input gradient"
            );
            assert!(g_theirs.get(w.as_tensor()).is_some());
            assert!(
                g_ours.get(w.as_tensor()).is_none(),
                "{dtype:?}: the frozen weight got a gradient"
            );
        }
    }

    #[test]
    fn refuses_mismatched_widths() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap();
        let e = frozen_matmul_t(&x, &w).unwrap_err();
        assert!(e.to_string().contains("frozen projection"), "{e}");
    }
}
