//! Fused causal attention as one candle custom op: scores, scale, soft-cap, the causal +
//! padding + sliding-window mask, softmax and times V, over q (b, s, heads, d) and k, v
//! (b, s, kv heads, d), with each row's padding given as the span of its real tokens. No
//! mask is materialised and the keys a query cannot see are never multiplied.
//!
//! On a GPU it runs arenaflow's CUDA kernels (`kernels/attention.cu`). On the CPU (f32) every
//! (row, head) is a rayon task that walks its real tokens in blocks of queries: one `gemm`
//! for the block's scores against the keys it can see (the causal triangle is skipped
//! block by block), the mask and softmax on that block while it is in cache, one `gemm`
//! times V. The `gemm` crate is the one candle's CPU matmul uses.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

/// Fused causal attention over (b, s, heads, d) inputs, with the padding given as each
/// row's real span (`bounds`, (b, 2) u32: start, end), an optional sliding window and
/// soft-cap. Queries outside their row's span come out as zeros.
#[derive(Clone)]
pub struct Attention {
    pub scale: f32,
    /// 0 for none.
    pub softcap: f32,
    /// 0 for none: a query sees keys fewer than `window` positions back.
    pub window: i32,
    pub bounds: Tensor,
}

/// The dimensions of one call: rows, sequence length, query heads, KV heads, head size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub s: usize,
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
}

impl Dims {
    /// Checks that q, k and v fit one another.
    pub(crate) fn of(q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, s, nh, d) = q.shape().dims4()?;
        let (kb, ks, nkv, kd) = k.shape().dims4()?;
        if (kb, ks, kd) != (b, s, d) || v.shape() != k.shape() || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        Ok(Dims { b, s, nh, nkv, d })
    }
}

/// Queries per block on the CPU: a block's scores (64 x up to s f32) stay in L2.
const QUERY_BLOCK: usize = 64;

impl Attention {
    fn cpu_bounds(&self, rows: usize, s: usize) -> Result<Vec<u32>> {
        let bounds = self.bounds.flatten_all()?.to_vec1::<u32>()?;
        if bounds.len() != 2 * rows {
            candle_core::bail!("attention: {} bounds for {rows} rows", bounds.len());
        }
        for span in bounds.chunks(2) {
            if span[0] > span[1] || span[1] as usize > s {
                candle_core::bail!("attention: span {span:?} outside 0..{s}");
            }
        }
        Ok(bounds)
    }

    /// One (row, head) task: the attention output of the row's real queries,
    /// (end - start) x d.
    fn cpu_head(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: Dims,
        bounds: &[u32],
        task: usize,
    ) -> Vec<f32> {
        let Dims { s, nh, nkv, d, .. } = dims;
        let (row, head) = (task / nh, task % nh);
        let (lo, hi) = (bounds[2 * row] as usize, bounds[2 * row + 1] as usize);
        let kvh = head / (nh / nkv);
        let q_at = |i: usize| ((row * s + i) * nh + head) * d;
        let kv_at = |j: usize| ((row * s + j) * nkv + kvh) * d;
        let window = self.window.max(0) as usize;
        let first_key = |i: usize| {
            if window > 0 {
                lo.max((i + 1).saturating_sub(window))
            } else {
                lo
            }
        };
        let mut out = vec![0f32; (hi - lo) * d];
        let mut scores = vec![0f32; QUERY_BLOCK * (hi - lo)];
        for i0 in (lo..hi).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(hi);
            let (m, k0) = (i1 - i0, first_key(i0));
            let n = i1 - k0;
            let scores = &mut scores[..m * n];
            // SAFETY: the pointers and strides address, for lhs, queries i0..i1 of this head
            // (m x d, rows nh * d apart), for rhs, K^T of keys k0..i1 of its KV head (d x n,
            // columns nkv * d apart), all inside q and k (i1 <= s); dst is m x n, row-major.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    q[q_at(i0)..].as_ptr(),
                    1,
                    (nh * d) as isize,
                    k[kv_at(k0)..].as_ptr(),
                    (nkv * d) as isize,
                    1,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (r, line) in scores.chunks_mut(n).enumerate() {
                let i = i0 + r;
                // Keys k0 + c for c in first..=last are visible to query i.
                let (first, last) = (first_key(i) - k0, i - k0);
                line[..first].fill(0.0);
                line[last + 1..].fill(0.0);
                let visible = &mut line[first..=last];
                if self.softcap > 0.0 {
                    let cap = self.softcap;
                    visible
                        .iter_mut()
                        .for_each(|x| *x = cap * (*x / cap).tanh());
                }
                let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in visible.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                visible.iter_mut().for_each(|x| *x *= inv);
            }
            // SAFETY: lhs is the m x n probabilities, rhs V of keys k0..i1 of this KV head
            // (n x d, rows nkv * d apart) inside v; dst rows (i0 - lo)..(i1 - lo) of `out`.
            unsafe {
                gemm::gemm(
                    m,
                    d,
                    n,
                    out[(i0 - lo) * d..].as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n as isize,
                    v[kv_at(k0)..].as_ptr(),
                    1,
                    (nkv * d) as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        out
    }

    fn cpu(&self, q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Result<Vec<f32>> {
        let Dims { b, s, nh, d, .. } = dims;
        let bounds = self.cpu_bounds(b, s)?;
        let heads: Vec<Vec<f32>> = (0..b * nh)
            .into_par_iter()
            .map(|task| self.cpu_head(q, k, v, dims, &bounds, task))
            .collect();
        let mut out = vec![0f32; b * s * nh * d];
        for (task, values) in heads.iter().enumerate() {
            let (row, head) = (task / nh, task % nh);
            let lo = bounds[2 * row] as usize;
            for (i, query) in values.chunks(d).enumerate() {
                let at = ((row * s + lo + i) * nh + head) * d;
                out[at..at + d].copy_from_slice(query);
            }
        }
        Ok(out)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "arenaflow-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(ql, kl, vl)?;
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!(
                "arenaflow-attention on the CPU takes f32, not {:?}",
                q.dtype()
            );
        };
        let out = self.cpu(
            contiguous(q, ql, "attention: q")?,
            contiguous(k, kl, "attention: k")?,
            contiguous(v, vl, "attention: v")?,
            dims,
        )?;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, _lse) = self.cuda(q, ql, k, kl, v, vl)?;
        Ok((out, ql.shape().clone()))
    }
}

/// A log-sum-exp buffer on the GPU: (b, nh, s) f32.
#[cfg(feature = "cuda")]
type Lse = candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>;

#[cfg(feature = "cuda")]
impl Attention {
    /// The output and each query's log-sum-exp.
    fn cuda(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Lse)> {
        crate::cuda::by_dtype!(
            self,
            "attention",
            q.dtype(),
            &q.device.clone(),
            (q, ql),
            (k, kl),
            (v, vl)
        )
    }

    /// The tensor-core kernel for bf16/f16 and head sizes 16..256, the simple one otherwise.
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (q, ql): (&candle_core::CudaStorage, &Layout),
        (k, kl): (&candle_core::CudaStorage, &Layout),
        (v, vl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Lse)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{fail, launch, suffix, view, ATTENTION};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let Dims { b, s, nh, nkv, d } = Dims::of(ql, kl, vl)?;
        let (bounds, bl) = self.bounds.storage_and_layout();
        let candle_core::Storage::Cuda(bounds) = &*bounds else {
            return Err(fail("attention: bounds must be on the GPU".into()));
        };
        let bounds = view!(bounds, bl, u32);
        let (qv, kv, vv) = (view!(q, ql, T), view!(k, kl, T), view!(v, vl, T));
        // SAFETY: every element is written by the kernel (queries outside a row's span
        // as zeros).
        let out = unsafe { dev.alloc::<T>(b * s * nh * d) }?;
        let lse = dev.alloc_zeros::<f32>(b * nh * s)?;
        let dtype = suffix(q.dtype())?;
        let mma = dtype != "f32" && [16, 32, 64, 128, 256].contains(&d);
        let (bi, si, nhi, nkvi, di) = (b as i32, s as i32, nh as i32, nkv as i32, d as i32);
        if mma {
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(64) as u32, nh as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: attention_mma_* take (q, k, v, bounds, out, lse, b, s, nh, nkv, scale,
            // softcap, window) over the contiguous layouts checked by Dims::of.
            launch!(dev, ATTENTION, format!("attention_mma_{dtype}_d{d}"), cfg;
                &qv, &kv, &vv, &bounds, &out, &lse, &bi, &si, &nhi, &nkvi,
                &self.scale, &self.softcap, &self.window);
        } else {
            if d > 256 {
                return Err(fail(format!("attention: head size {d} is over 256")));
            }
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(4) as u32, nh as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: attention_simple_* take (q, k, v, bounds, out, lse, b, s, nh, nkv, d,
            // scale, softcap, window).
            launch!(dev, ATTENTION, format!("attention_simple_{dtype}"), cfg;
                &qv, &kv, &vv, &bounds, &out, &lse, &bi, &si, &nhi, &nkvi, &di,
                &self.scale, &self.softcap, &self.window);
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            lse,
        ))
    }
}

/// The fused attention with a backward pass, for training on a GPU: the forward keeps each
/// query's log-sum-exp, from which the backward (`kernels/attention_backward.cu`) recomputes
/// the probabilities tile by tile. The CPU trains through candle's composed ops instead.
pub struct TrainAttention {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    op: Attention,
    #[cfg(feature = "cuda")]
    lse: std::sync::Mutex<Option<std::sync::Arc<Lse>>>,
}

const CPU_TRAINING: &str = "the fused attention's backward pass runs on a GPU; the CPU trains \
     through candle's composed attention";

impl CustomOp3 for TrainAttention {
    fn name(&self) -> &'static str {
        "arenaflow-attention-train"
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
        candle_core::bail!("{CPU_TRAINING}")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, lse) = self.op.cuda(q, ql, k, kl, v, vl)?;
        *self.lse.lock().expect("the lse lock") = Some(std::sync::Arc::new(lse));
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().expect("the lse lock").clone();
        let Some(lse) = lse else {
            candle_core::bail!("attention: the backward pass ran before the forward");
        };
        let grads = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionBackward {
                op: self.op.clone(),
                out: out.clone(),
                dout: grad.contiguous()?,
                lse,
            },
        )?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(grads.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(grads.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(grads.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// dq, dk and dv of [`TrainAttention`] flattened into one (|q| + 2 |k|) tensor (one op has one
/// output).
#[cfg(feature = "cuda")]
struct AttentionBackward {
    op: Attention,
    out: Tensor,
    dout: Tensor,
    lse: std::sync::Arc<Lse>,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "arenaflow-attention-backward"
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
        candle_core::bail!("{CPU_TRAINING}")
    }

    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(
            self,
            "attention backward",
            q.dtype(),
            &q.device.clone(),
            (q, ql),
            (k, kl),
            (v, vl)
        )
    }
}

#[cfg(feature = "cuda")]
impl AttentionBackward {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (q, ql): (&candle_core::CudaStorage, &Layout),
        (k, kl): (&candle_core::CudaStorage, &Layout),
        (v, vl): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        use crate::cuda::{allow_shared, fail, launch, suffix, view, ATTENTION_BACKWARD};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        use candle_core::Storage;
        let Dims { b, s, nh, nkv, d } = Dims::of(ql, kl, vl)?;
        if d % 2 != 0 || d > 256 {
            return Err(fail(format!(
                "attention backward: head size {d} (even, at most 256)"
            )));
        }
        for (what, t) in [("output", &self.out), ("output gradient", &self.dout)] {
            if t.shape() != ql.shape() {
                return Err(fail(format!(
                    "attention backward: {what} {:?}, q {:?}",
                    t.shape(),
                    ql.shape()
                )));
            }
        }
        let (bounds, bl) = self.op.bounds.storage_and_layout();
        let (out, ol) = self.out.storage_and_layout();
        let (dout, dl) = self.dout.storage_and_layout();
        let (Storage::Cuda(bounds), Storage::Cuda(out), Storage::Cuda(dout)) =
            (&*bounds, &*out, &*dout)
        else {
            return Err(fail(
                "attention backward: bounds, output and its gradient must be on the GPU".into(),
            ));
        };
        let bounds = view!(bounds, bl, u32);
        let (out, dout) = (view!(out, ol, T), view!(dout, dl, T));
        let (qv, kv, vv) = (view!(q, ql, T), view!(k, kl, T), view!(v, vl, T));
        let dtype = suffix(q.dtype())?;
        let (si, nhi, nkvi, di) = (s as i32, nh as i32, nkv as i32, d as i32);
        let (scale, softcap, window) = (self.op.scale, self.op.softcap, self.op.window);

        let delta = dev.alloc_zeros::<f32>(b * nh * s)?;
        let cfg = LaunchConfig {
            grid_dim: (s.div_ceil(4) as u32, nh as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_bwd_delta_* take (out, dout, bounds, delta, s, nh, d); out and
        // dout are (b, s, nh, d) as checked above, delta (b, nh, s).
        launch!(dev, ATTENTION_BACKWARD, format!("attention_bwd_delta_{dtype}"), cfg;
            &out, &dout, &bounds, &delta, &si, &nhi, &di);

        let (nq, nk) = (b * s * nh * d, b * s * nkv * d);
        let mut grads = dev.alloc_zeros::<T>(nq + 2 * nk)?;
        // Tensor cores for bf16/f16 at head sizes 64, 128 and 256 (64 keys or queries a
        // block of 128 threads; checked on an H200 by
        // `cuda_attention_backward_matches_composed_autograd`) unless
        // ARENAFLOW_ATTENTION_BACKWARD=f32 asks for the f32 kernels, which take every
        // other case, their tile sizes those of attention_backward.cu's GRADS lines.
        let mma = dtype != "f32"
            && matches!(d, 64 | 128 | 256)
            && std::env::var("ARENAFLOW_ATTENTION_BACKWARD").as_deref() != Ok("f32");
        let dm = match d {
            0..=64 => 64,
            65..=128 => 128,
            _ => 256,
        };
        let (kernel, tile, threads): (String, usize, u32) = if mma {
            (format!("mma_{dtype}_d{d}"), 64, 128)
        } else {
            let tile = match (dtype, dm) {
                ("f32", 64) => 32,
                ("f32", 128) => 16,
                ("f32", _) => 8,
                (_, 256) => 16,
                _ => 32,
            };
            (format!("{dtype}_d{dm}"), tile, 256)
        };
        let lse = &*self.lse;
        {
            let (mut dq, mut rest) = grads.split_at_mut(nq);
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            let cfg = |heads: usize, shared: u32| LaunchConfig {
                grid_dim: (s.div_ceil(tile) as u32, heads as u32, b as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: shared,
            };
            // The tensor-core kernels take no head-size argument (it is their template's),
            // and their tiles in dynamic shared memory.
            if mma {
                let (kv_shared, q_shared) = mma_backward_shared(d);
                // Head size 256: dv, then dk, each launch computing one (a thread cannot hold
                // both's accumulators); one launch for both below.
                let kv_kernels: &[&str] = if d == 256 { &["dv", "dk"] } else { &["dkdv"] };
                for part in kv_kernels {
                    let name = format!("attention_bwd_{part}_{kernel}");
                    allow_shared(dev, ATTENTION_BACKWARD, &name, kv_shared)?;
                    // SAFETY: attention_bwd_{dkdv,dv,dk}_mma_* take (q, k, v, dout, lse,
                    // delta, bounds, dk, dv, s, nh, nkv, scale, softcap, window) and write
                    // dk and/or dv (b, s, nkv, d) whole, d being the kernel's head size; the
                    // shared memory is the kernel's MmaTiles (it traps on less).
                    launch!(dev, ATTENTION_BACKWARD, name, cfg(nkv, kv_shared);
                        &qv, &kv, &vv, &dout, lse, &delta, &bounds, &mut dk, &mut dv, &si, &nhi,
                        &nkvi, &scale, &softcap, &window);
                }
                let name = format!("attention_bwd_dq_{kernel}");
                allow_shared(dev, ATTENTION_BACKWARD, &name, q_shared)?;
                // SAFETY: attention_bwd_dq_mma_* take (q, k, v, dout, lse, delta, bounds, dq,
                // s, nh, nkv, scale, softcap, window) and write dq (b, s, nh, d) whole.
                launch!(dev, ATTENTION_BACKWARD, name, cfg(nh, q_shared);
                    &qv, &kv, &vv, &dout, lse, &delta, &bounds, &mut dq, &si, &nhi, &nkvi,
                    &scale, &softcap, &window);
            } else {
                // SAFETY: attention_bwd_dkdv_* take (q, k, v, dout, lse, delta, bounds, dk,
                // dv, s, nh, nkv, d, scale, softcap, window) and write dk, dv (b, s, nkv, d)
                // whole.
                launch!(dev, ATTENTION_BACKWARD, format!("attention_bwd_dkdv_{kernel}"), cfg(nkv, 0);
                    &qv, &kv, &vv, &dout, lse, &delta, &bounds, &mut dk, &mut dv, &si, &nhi,
                    &nkvi, &di, &scale, &softcap, &window);
                // SAFETY: attention_bwd_dq_* take (q, k, v, dout, lse, delta, bounds, dq, s,
                // nh, nkv, d, scale, softcap, window) and write dq (b, s, nh, d) whole.
                launch!(dev, ATTENTION_BACKWARD, format!("attention_bwd_dq_{kernel}"), cfg(nh, 0);
                    &qv, &kv, &vv, &dout, lse, &delta, &bounds, &mut dq, &si, &nhi, &nkvi, &di,
                    &scale, &softcap, &window);
            }
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(grads, dev.clone()),
            Shape::from(nq + 2 * nk),
        ))
    }
}

/// The tensor-core backward's dynamic shared memory in bytes at head size `d`, (the dk/dv
/// kernels', the dq kernel's): `MmaTiles` of attention_backward.cu in 2-byte elements, rows
/// of d + 8. dk/dv: k and v tiles of 64 keys, q and dout tiles of 16 queries. dq: k and v
/// tiles of 64 keys (32 at head size 256, where q and dout of the block's 64 queries are
/// tiles too).
#[cfg(feature = "cuda")]
fn mma_backward_shared(d: usize) -> (u32, u32) {
    let row = (d + 8) * 2;
    let kv = (2 * 64 + 2 * 16) * row;
    let q = if d > 128 {
        (2 * 32 + 2 * 64) * row
    } else {
        2 * 64 * row
    };
    (kv as u32, q as u32)
}

/// Differentiable fused attention (a GPU's kernels; see [`TrainAttention`]).
pub fn attention_train(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        TrainAttention {
            op,
            #[cfg(feature = "cuda")]
            lse: std::sync::Mutex::new(None),
        },
    )
}

/// Attention output (b, s, nh, d) for rope'd q (b, s, nh, d) and k, v (b, s, nkv, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> Result<Tensor> {
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SplitMix64;
    use candle_core::Device;

    /// The attention of one query, straight from the definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: Dims,
        op: (f32, f32, usize),
        span: (usize, usize),
        row: usize,
        i: usize,
        head: usize,
    ) -> Vec<f64> {
        let Dims { s, nh, nkv, d, .. } = dims;
        let (scale, softcap, window) = op;
        let kvh = head / (nh / nkv);
        if i < span.0 || i >= span.1 {
            return vec![0.0; d];
        }
        let qv = &q[((row * s + i) * nh + head) * d..][..d];
        let keys: Vec<usize> = (span.0..=i)
            .filter(|&j| window == 0 || i - j < window)
            .collect();
        let scores: Vec<f64> = keys
            .iter()
            .map(|&j| {
                let kv = &k[((row * s + j) * nkv + kvh) * d..][..d];
                let dot: f64 = qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum();
                let x = dot * scale as f64;
                if softcap > 0.0 {
                    softcap as f64 * (x / softcap as f64).tanh()
                } else {
                    x
                }
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        let mut out = vec![0.0; d];
        for (&j, w) in keys.iter().zip(&weights) {
            let vv = &v[((row * s + j) * nkv + kvh) * d..][..d];
            for (o, x) in out.iter_mut().zip(vv) {
                *o += w / sum * *x as f64;
            }
        }
        out
    }

    #[test]
    fn cpu_attention_matches_the_definition() {
        // 3 rows of 150 positions (more than two query blocks): right padding, left
        // padding, and an empty row; GQA 6 query heads on 2 KV heads.
        let dims = Dims {
            b: 3,
            s: 150,
            nh: 6,
            nkv: 2,
            d: 16,
        };
        let spans = [(0usize, 141usize), (17, 150), (0, 0)];
        let mut rng = SplitMix64::new(7);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_normal() as f32).collect() };
        let q = values(dims.b * dims.s * dims.nh * dims.d);
        let k = values(dims.b * dims.s * dims.nkv * dims.d);
        let v = values(dims.b * dims.s * dims.nkv * dims.d);
        let dev = Device::Cpu;
        let bounds: Vec<u32> = spans
            .iter()
            .flat_map(|&(a, b)| [a as u32, b as u32])
            .collect();
        for (scale, softcap, window) in [
            (0.25f32, 0f32, 0usize),
            (0.25, 2.0, 0),
            (0.25, 0.0, 37),
            (0.5, 1.5, 70),
        ] {
            let op = Attention {
                scale,
                softcap,
                window: window as i32,
                bounds: Tensor::from_vec(bounds.clone(), (3, 2), &dev).unwrap(),
            };
            let t = |x: &[f32], h: usize| {
                Tensor::from_slice(x, (dims.b, dims.s, h, dims.d), &dev).unwrap()
            };
            let out = attention(&t(&q, dims.nh), &t(&k, dims.nkv), &t(&v, dims.nkv), op).unwrap();
            assert_eq!(out.dims(), &[dims.b, dims.s, dims.nh, dims.d]);
            let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut worst = 0f64;
            for (row, &span) in spans.iter().enumerate() {
                for i in 0..dims.s {
                    for head in 0..dims.nh {
                        let want = reference(
                            &q,
                            &k,
                            &v,
                            dims,
                            (scale, softcap, window),
                            span,
                            row,
                            i,
                            head,
                        );
                        let got = &out[((row * dims.s + i) * dims.nh + head) * dims.d..][..dims.d];
                        for (g, w) in got.iter().zip(&want) {
                            worst = worst.max((*g as f64 - w).abs());
                        }
                    }
                }
            }
            assert!(
                worst < 1e-5,
                "scale {scale} softcap {softcap} window {window}: max |diff| {worst}"
            );
        }
    }
}
