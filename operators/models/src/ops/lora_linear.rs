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
    /// cuBLAS's epilogue instead of the composed arithmetic (`epilogue`): the GPU under
    /// autocast, unless `ARENAFLOW_LORA_EPILOGUE=0` turns it off.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    epilogue: bool,
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
        if self.epilogue {
            return epilogue::forward(self, (x, xl), (a, al), (b, bl), (w, wl));
        }
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
        #[cfg(feature = "cuda")]
        if self.epilogue {
            return epilogue::backward(self, &x, &a, &b, grad);
        }
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
    // cuBLAS's epilogue: autocast (the adapter's products in the model's bf16 or f16) on a
    // GPU, unless turned off.
    let epilogue = x.device().is_cuda()
        && dtype == x.dtype()
        && matches!(dtype, DType::BF16 | DType::F16)
        && !matches!(
            std::env::var("ARENAFLOW_LORA_EPILOGUE").as_deref(),
            Ok("0") | Ok("off")
        );
    x.apply_op3(
        a,
        b,
        LoraLinear {
            weight: weight.clone(),
            scaling: scaling as f32,
            dtype,
            epilogue,
        },
    )
}

/// The projection on cuBLAS with the update and the input gradient's two terms summed in
/// the products' epilogues (`beta = 1`) and the scaling in their `alpha`: no pass over the
/// output or the input of its own (LoraAdd's sum, Scaled's gradient, the gradient's add);
/// the second product is accumulated in f32 onto the first's rounded result and rounded
/// once more. Under autocast only (the adapter's products in the
/// model's dtype), on a GPU, unless `ARENAFLOW_LORA_EPILOGUE=0` turns it off: it rounds
/// less often than PyTorch's autocast (which rounds the update, the scaled update and the
/// sum, and each term of the input gradient), so its bits are not the composed path's; `cuda_lora_epilogue_tracks_the_composed_ops`
/// holds it within bf16's rounding of them. Backward: dA and dB come out of their products
/// in the model's dtype and are cast to the adapter's f32, as under autocast.
#[cfg(feature = "cuda")]
mod epilogue {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::result::gemm_ex;
    use candle_core::cuda_backend::cudarc::cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
    };
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

    use super::{dims, LoraLinear};

    /// One product C = alpha op(A) op(B) + beta C of row-major matrices: `t` says which of
    /// A and B are transposed, (m, n, k) with C m x n, op(A) m x k, op(B) k x n.
    #[derive(Clone, Copy)]
    struct Product {
        t: (bool, bool),
        mnk: (usize, usize, usize),
        alpha: f32,
        beta: f32,
    }

    fn product(t: (bool, bool), mnk: (usize, usize, usize), alpha: f32, beta: f32) -> Product {
        Product {
            t,
            mnk,
            alpha,
            beta,
        }
    }

    /// Which operands a product transposes: neither, the second (x W^T), the first.
    const NN: (bool, bool) = (false, false);
    const NT: (bool, bool) = (false, true);
    const TN: (bool, bool) = (true, false);

    /// cuBLAS on a device's stream with elements of `dtype` and f32 arithmetic.
    struct Blas<'a> {
        dev: &'a CudaDevice,
        element: cudaDataType,
    }

    impl<'a> Blas<'a> {
        fn new(dev: &'a CudaDevice, dtype: DType) -> Result<Self> {
            let element = match dtype {
                DType::BF16 => cudaDataType::CUDA_R_16BF,
                DType::F16 => cudaDataType::CUDA_R_16F,
                other => candle_core::bail!("lora epilogue: {other:?}"),
            };
            Ok(Self { dev, element })
        }

        /// `p` on A, B and C given with their stored rows' lengths: cuBLAS's column-major
        /// call on the transposes, C^T = op(B)^T op(A)^T.
        fn run<A: DevicePtr<T>, B: DevicePtr<T>, C: DevicePtrMut<T>, T>(
            &self,
            p: Product,
            (a, lda): (&A, usize),
            (b, ldb): (&B, usize),
            (c, ldc): (&mut C, usize),
        ) -> Result<()> {
            let op = |t: bool| {
                if t {
                    cublasOperation_t::CUBLAS_OP_T
                } else {
                    cublasOperation_t::CUBLAS_OP_N
                }
            };
            let ((ta, tb), (m, n, k)) = (p.t, p.mnk);
            let blas = self.dev.cublas_handle();
            let stream = self.dev.cuda_stream();
            let (a, _ra) = a.device_ptr(&stream);
            let (b, _rb) = b.device_ptr(&stream);
            let (c, _rc) = c.device_ptr_mut(&stream);
            // SAFETY: the caller passes matrices of the shapes and leading dimensions named,
            // on the device's stream (the handle's).
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    op(tb),
                    op(ta),
                    n as i32,
                    m as i32,
                    k as i32,
                    (&p.alpha) as *const f32 as *const _,
                    b as *const _,
                    self.element,
                    ldb as i32,
                    a as *const _,
                    self.element,
                    lda as i32,
                    (&p.beta) as *const f32 as *const _,
                    c as *mut _,
                    self.element,
                    ldc as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .w()
        }
    }

    /// The projection's dimensions (m, k, n, r) and A and B in the model's dtype (cast from
    /// the adapter's f32), contiguous.
    #[allow(clippy::type_complexity)]
    fn operands(
        dtype: DType,
        xl: &Layout,
        (a, al): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        wl: &Layout,
    ) -> Result<(
        (usize, usize, usize, usize),
        (CudaStorage, Layout),
        (CudaStorage, Layout),
    )> {
        let dims = dims(xl, al, bl, wl)?;
        let cast = |s: &CudaStorage, l: &Layout| -> Result<(CudaStorage, Layout)> {
            Ok((s.to_dtype(l, dtype)?, Layout::contiguous(l.shape())))
        };
        Ok((dims, cast(a, al)?, cast(b, bl)?))
    }

    macro_rules! by_type {
        ($dtype:expr, $f:ident ($($arg:expr),*)) => {
            match $dtype {
                DType::BF16 => $f::<half::bf16>($($arg),*),
                DType::F16 => $f::<half::f16>($($arg),*),
                other => candle_core::bail!("lora epilogue: {other:?}"),
            }
        };
    }

    /// out = x W^T, then out += scaling (x A^T) B^T in the product's epilogue.
    pub(super) fn forward(
        op: &LoraLinear,
        (x, xl): (&CudaStorage, &Layout),
        (a, al): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            op: &LoraLinear,
            (x, xl): (&CudaStorage, &Layout),
            (a, al): (&CudaStorage, &Layout),
            (b, bl): (&CudaStorage, &Layout),
            (w, wl): (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let ((m, k, n, r), (a, al), (b, bl)) = operands(op.dtype, xl, (a, al), (b, bl), wl)?;
            let dev = &x.device;
            let blas = Blas::new(dev, op.dtype)?;
            let (xv, wv) = (crate::cuda::view!(x, xl, T), crate::cuda::view!(w, wl, T));
            let (av, bv) = (crate::cuda::view!(a, &al, T), crate::cuda::view!(b, &bl, T));
            // SAFETY: both are written whole by the products below before any read.
            let mut out = unsafe { dev.alloc::<T>(m * n) }?;
            let mut xa = unsafe { dev.alloc::<T>(m * r) }?;
            let base = product(NT, (m, n, k), 1.0, 0.0);
            let rank = product(NT, (m, r, k), 1.0, 0.0);
            blas.run(base, (&xv, k), (&wv, k), (&mut out, n))?;
            blas.run(rank, (&xv, k), (&av, k), (&mut xa, r))?;
            let update = product(NT, (m, n, r), op.scaling, 1.0);
            blas.run(update, (&xa, r), (&bv, r), (&mut out, n))?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((m, n)),
            ))
        }
        by_type!(op.dtype, run(op, (x, xl), (a, al), (b, bl), (w, wl)))
    }

    /// The gradients of x, A and B as one flat tensor in the model's dtype, [dx | dA | dB]:
    /// one op over (grad, x, A) with B and W its own.
    struct Backward {
        weight: Tensor,
        b: Tensor,
        scaling: f32,
        dtype: DType,
    }

    impl CustomOp3 for Backward {
        fn name(&self) -> &'static str {
            "arenaflow-lora-epilogue-backward"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("lora epilogue: a GPU's path")
        }

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            gl: &Layout,
            x: &CudaStorage,
            xl: &Layout,
            a: &CudaStorage,
            al: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (b, bl) = self.b.storage_and_layout();
            let (w, wl) = self.weight.storage_and_layout();
            let (candle_core::Storage::Cuda(b), candle_core::Storage::Cuda(w)) = (&*b, &*w) else {
                candle_core::bail!("lora epilogue: B and W must be on the GPU");
            };
            by_type!(
                self.dtype,
                run(self, (g, gl), (x, xl), (a, al), (b, bl), (w, wl))
            )
        }
    }

    fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        op: &Backward,
        (g, gl): (&CudaStorage, &Layout),
        (x, xl): (&CudaStorage, &Layout),
        (a, al): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let ((m, k, n, r), (a, al), (b, bl)) = operands(op.dtype, xl, (a, al), (b, bl), wl)?;
        if gl.shape().dims2()? != (m, n) {
            candle_core::bail!(
                "lora epilogue: gradient {:?} of an {m} x {n} output",
                gl.shape()
            );
        }
        let dev = &x.device;
        let blas = Blas::new(dev, op.dtype)?;
        let (gv, xv) = (crate::cuda::view!(g, gl, T), crate::cuda::view!(x, xl, T));
        let wv = crate::cuda::view!(w, wl, T);
        let (av, bv) = (crate::cuda::view!(a, &al, T), crate::cuda::view!(b, &bl, T));
        let s = op.scaling;
        // SAFETY: each buffer is written whole by its first product (beta 0) before a read.
        let mut xa = unsafe { dev.alloc::<T>(m * r) }?;
        let mut gxa = unsafe { dev.alloc::<T>(m * r) }?;
        let mut out = unsafe { dev.alloc::<T>(m * k + r * k + n * r) }?;
        let rank = product(NT, (m, r, k), 1.0, 0.0);
        blas.run(rank, (&xv, k), (&av, k), (&mut xa, r))?;
        // d(xA^T) = scaling g B
        let rank_grad = product(NN, (m, r, n), s, 0.0);
        blas.run(rank_grad, (&gv, n), (&bv, r), (&mut gxa, r))?;
        {
            let (mut dx, mut rest) = out.split_at_mut(m * k);
            let (mut da, mut db) = rest.split_at_mut(r * k);
            // dx = g W + d(xA^T) A, the second in the first's epilogue
            let base = product(NN, (m, k, n), 1.0, 0.0);
            let update = product(NN, (m, k, r), 1.0, 1.0);
            blas.run(base, (&gv, n), (&wv, k), (&mut dx, k))?;
            blas.run(update, (&gxa, r), (&av, k), (&mut dx, k))?;
            // dA = d(xA^T)^T x, dB = scaling g^T (x A^T)
            let a_grad = product(TN, (r, k, m), 1.0, 0.0);
            let b_grad = product(TN, (n, r, m), s, 0.0);
            blas.run(a_grad, (&gxa, r), (&xv, k), (&mut da, k))?;
            blas.run(b_grad, (&gv, n), (&xa, r), (&mut db, r))?;
        }
        let len = m * k + r * k + n * r;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(len),
        ))
    }

    /// dx, dA and dB (A's and B's in their own dtype) from one op.
    pub(super) fn backward(
        op: &LoraLinear,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (n, r) = b.dims2()?;
        let flat = grad.contiguous()?.apply_op3_no_bwd(
            &x.contiguous()?,
            a,
            &Backward {
                weight: op.weight.clone(),
                b: b.clone(),
                scaling: op.scaling,
                dtype: op.dtype,
            },
        )?;
        let dx = flat.narrow(0, 0, m * k)?.reshape((m, k))?;
        let da = flat
            .narrow(0, m * k, r * k)?
            .reshape((r, k))?
            .to_dtype(a.dtype())?;
        let db = flat
            .narrow(0, m * k + r * k, n * r)?
            .reshape((n, r))?
            .to_dtype(b.dtype())?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}
