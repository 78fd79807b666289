//! A LoRA projection in training as one op: `x W^T + scaling · (x A^T) B^T` with the frozen
//! weight W (no gradient) and the adapter's A (r, k) and B (n, r), the adapter's products in
//! `dtype` (the adapter's f32 as PEFT, or the model's under autocast).
//!
//! Composed, candle's graph keeps every intermediate of the projection alive until the
//! layer's backward pass has run: the frozen product and the update (each of the output's
//! size), the casts of x and of the adapter, and the rank-r product. That is the output's
//! size twice over per projection: about 1.3 GB a Llama-3.1-8B layer at 8,192 tokens, once
//! under gradient checkpointing (the layer being recomputed) and for every layer without
//! it. This op keeps x and its output only; the intermediates live while the op runs. Its
//! backward recomputes the rank-r product x A^T (r / n of the frozen product's work).
//!
//! The arithmetic is the composed path's, op for op: the same products in the same layouts,
//! the same casts, [`super::lora::LoraAdd`]'s rounding and [`super::lora::Scaled`]'s
//! gradient, so the output and the gradients of x, A and B are the same bits
//! (`matches_the_composed_projection_bit_for_bit`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::lora::{LoraAdd, Scaled};

struct LoraLinear {
    weight: Tensor,
    scaling: f32,
    dtype: DType,
}

/// The projection's (m, k, n, r) for x (m, k), A (r, k), B (n, r) and W (n, k).
fn dims(
    xl: &Layout,
    al: &Layout,
    bl: &Layout,
    wl: &Layout,
) -> Result<(usize, usize, usize, usize)> {
    let (m, k) = xl.shape().dims2()?;
    let (r, ka) = al.shape().dims2()?;
    let (n, rb) = bl.shape().dims2()?;
    let (nw, kw) = wl.shape().dims2()?;
    if ka != k || kw != k || nw != n || rb != r {
        candle_core::bail!(
            "lora projection: x {:?}, A {:?}, B {:?}, W {:?}",
            xl.shape(),
            al.shape(),
            bl.shape(),
            wl.shape()
        );
    }
    Ok((m, k, n, r))
}

impl LoraLinear {
    /// The forward pass on one backend's storages; `add` is LoraAdd's forward there.
    #[allow(clippy::too_many_arguments)]
    fn forward<S: BackendStorage>(
        &self,
        (x, xl): (&S, &Layout),
        (a, al): (&S, &Layout),
        (b, bl): (&S, &Layout),
        (w, wl): (&S, &Layout),
        add: impl FnOnce(&S, &Layout, &S, &Layout) -> Result<(S, Shape)>,
    ) -> Result<(S, Shape)> {
        let (m, k, n, r) = dims(xl, al, bl, wl)?;
        // The frozen product, as ops::frozen computes it.
        let base = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        // Tensor::to_dtype's cast (none when the dtype is already the one): a contiguous
        // copy of the operand's shape.
        let cast = |s: &S, l: &Layout| -> Result<Option<(S, Layout)>> {
            if s.dtype() == self.dtype {
                Ok(None)
            } else {
                Ok(Some((
                    s.to_dtype(l, self.dtype)?,
                    Layout::contiguous(l.shape()),
                )))
            }
        };
        let (xc, ac, bc) = (cast(x, xl)?, cast(a, al)?, cast(b, bl)?);
        let (x, xl) = xc.as_ref().map_or((x, xl), |(s, l)| (s, l));
        let (a, al) = ac.as_ref().map_or((a, al), |(s, l)| (s, l));
        let (b, bl) = bc.as_ref().map_or((b, bl), |(s, l)| (s, l));
        let xa = x.matmul(a, (1, m, r, k), xl, &al.transpose(0, 1)?)?;
        let update = xa.matmul(
            b,
            (1, m, n, r),
            &Layout::contiguous((m, r)),
            &bl.transpose(0, 1)?,
        )?;
        let out = Layout::contiguous((m, n));
        add(&base, &out, &update, &out)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "arenaflow-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w else {
            candle_core::bail!("lora projection: the frozen weight is not on the CPU");
        };
        let add = LoraAdd {
            scaling: self.scaling,
        };
        self.forward((x, xl), (a, al), (b, bl), (w, wl), |r, rl, u, ul| {
            add.cpu_fwd(r, rl, u, ul)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*w else {
            candle_core::bail!("lora projection: the frozen weight is not on the GPU");
        };
        let add = LoraAdd {
            scaling: self.scaling,
        };
        self.forward((x, xl), (a, al), (b, bl), (w, wl), |r, rl, u, ul| {
            add.cuda_fwd(r, rl, u, ul)
        })
    }

    /// Each line is the gradient candle's autograd takes through the composed projection
    /// (Matmul: `grad.matmul(rhs.t())` and `lhs.t().matmul(grad)`; Transpose, ToDType and
    /// LoraAdd's backward), in the same layouts.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: a gradient computed from the graph's tensors would keep their graph (x's
        // layer, step after step in the optimizer's state); candle detaches each node's
        // gradient as it reaches it, but never a variable's, and A and B are variables.
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let (xc, at, bt) = (
            x.to_dtype(self.dtype)?,
            a.to_dtype(self.dtype)?.t()?,
            b.to_dtype(self.dtype)?.t()?,
        );
        let xa = xc.matmul(&at)?;
        let update_grad = grad.contiguous()?.apply_op1_no_bwd(&Scaled {
            scaling: self.scaling,
            to_f32: self.dtype == DType::F32,
        })?;
        let xa_grad = update_grad.matmul(&bt.t()?)?;
        let b_grad = xa.t()?.matmul(&update_grad)?.t()?.to_dtype(b.dtype())?;
        let xc_grad = xa_grad.matmul(&at.t()?)?;
        let a_grad = xc.t()?.matmul(&xa_grad)?.t()?.to_dtype(a.dtype())?;
        let x_grad = (grad.matmul(&self.weight)? + xc_grad.to_dtype(x.dtype())?)?;
        Ok((Some(x_grad), Some(a_grad), Some(b_grad)))
    }
}

/// Whether [`lora_linear`] takes a model of `model` dtype with the adapter's products in
/// `adapter` dtype (f32, bf16 or f16 each; f64, the gradient checks' dtype, takes the
/// composed ops, whose LoraAdd is composed there).
pub fn takes(model: DType, adapter: DType) -> bool {
    let kernel = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
    kernel(model) && kernel(adapter)
}

/// `x W^T + scaling · T(x A^T) B^T` for x (m, k), the frozen W (n, k), A (r, k) and B (n, r),
/// the adapter's products in `dtype` and the sum rounded as [`super::lora::lora_add`]:
/// differentiable in x, A and B (see the module).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dtype: DType,
) -> Result<Tensor> {
    x.apply_op3(
        a,
        b,
        LoraLinear {
            weight: weight.clone(),
            scaling: scaling as f32,
            dtype,
        },
    )
}
