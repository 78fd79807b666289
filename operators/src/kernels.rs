//! arenaflow's own CUDA kernels (kernels/arenaflow.cu) as candle custom ops: the CUDA side
//! of the fused attention (`attention.rs`), RMSNorm and the MLP's gated activation. The
//! forward pass uses them on a GPU in inference; `ARENAFLOW_GPU_KERNELS=off` falls back to
//! candle's composed ops, for comparisons.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::attention::{Attention, Dims};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/arenaflow.ptx"));
const MODULE: &str = "arenaflow";

fn fail(message: String) -> candle_core::Error {
    candle_core::Error::Cuda(message.into())
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => {
            return Err(fail(format!(
                "arenaflow kernels take f32, bf16 or f16, not {other:?}"
            )))
        }
    })
}

/// `op.launch::<T>(args)` for the element type of `dtype`.
macro_rules! by_dtype {
    ($op:expr, $what:literal, $dtype:expr, $($arg:expr),*) => {
        match $dtype {
            DType::BF16 => $op.launch::<bf16>($($arg),*),
            DType::F16 => $op.launch::<f16>($($arg),*),
            DType::F32 => $op.launch::<f32>($($arg),*),
            other => Err(fail(format!("{}: dtype {other:?}", $what))),
        }
    };
}

/// A contiguous tensor's slice of its storage, as a kernel argument.
macro_rules! view {
    ($storage:expr, $layout:expr, $t:ty) => {{
        let (start, end) = $layout
            .contiguous_offsets()
            .ok_or_else(|| fail("arenaflow kernels need contiguous inputs".into()))?;
        $storage.as_cuda_slice::<$t>()?.slice(start..end)
    }};
}

impl Attention {
    fn launch<T>(
        &self,
        dev: &CudaDevice,
        (q, ql): (&CudaStorage, &Layout),
        (k, kl): (&CudaStorage, &Layout),
        (v, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let Dims { b, s, nh, nkv, d } = Dims::of(ql, kl, vl)?;
        let (bounds, bl) = self.bounds.storage_and_layout();
        let Storage::Cuda(bounds) = &*bounds else {
            return Err(fail("attention: bounds must be on the GPU".into()));
        };
        let bounds = view!(bounds, bl, u32);
        let (qv, kv, vv) = (view!(q, ql, T), view!(k, kl, T), view!(v, vl, T));
        let out = unsafe { dev.alloc::<T>(b * s * nh * d) }?;
        let dtype = suffix(q.dtype())?;
        let mma = dtype != "f32" && [16, 32, 64, 128, 256].contains(&d);
        let (bi, si, nhi, nkvi, di) = (b as i32, s as i32, nh as i32, nkv as i32, d as i32);
        if mma {
            let func =
                dev.get_or_load_custom_func(&format!("attention_mma_{dtype}_d{d}"), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(64) as u32, nh as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut args = func.builder();
            args.arg(&qv).arg(&kv).arg(&vv).arg(&bounds).arg(&out);
            args.arg(&bi).arg(&si).arg(&nhi).arg(&nkvi);
            args.arg(&self.scale).arg(&self.softcap).arg(&self.window);
            unsafe { args.launch(cfg) }.w()?;
        } else {
            if d > 256 {
                return Err(fail(format!("attention: head size {d} is over 256")));
            }
            let func =
                dev.get_or_load_custom_func(&format!("attention_simple_{dtype}"), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (s.div_ceil(4) as u32, nh as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut args = func.builder();
            args.arg(&qv).arg(&kv).arg(&vv).arg(&bounds).arg(&out);
            args.arg(&bi).arg(&si).arg(&nhi).arg(&nkvi).arg(&di);
            args.arg(&self.scale).arg(&self.softcap).arg(&self.window);
            unsafe { args.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, s, nh, d)),
        ))
    }
}

/// The CUDA side of [`Attention`]: the tensor-core kernel for bf16/f16 and head sizes
/// 16..256, the simple one otherwise.
pub(crate) fn attention_cuda(
    op: &Attention,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(op, "attention", q.0.dtype(), &q.0.device.clone(), q, k, v)
}

/// RMSNorm over the last axis with an f32 weight (`gemma`: the weight is 1 + w).
pub struct RmsNorm {
    pub eps: f32,
    pub gemma: bool,
}

impl RmsNorm {
    fn launch<T>(
        &self,
        dev: &CudaDevice,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let cols = *xl.shape().dims().last().unwrap_or(&0);
        if wl.shape().elem_count() != cols || cols == 0 {
            return Err(fail(format!(
                "rms_norm: weight {:?} for rows of {cols}",
                wl.shape()
            )));
        }
        let rows = xl.shape().elem_count() / cols;
        let (xv, wv) = (view!(x, xl, T), view!(w, wl, f32));
        let out = unsafe { dev.alloc::<T>(rows * cols) }?;
        let func =
            dev.get_or_load_custom_func(&format!("rms_norm_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c, gemma) = (cols as i32, self.gemma as i32);
        let mut args = func.builder();
        args.arg(&xv)
            .arg(&wv)
            .arg(&out)
            .arg(&c)
            .arg(&self.eps)
            .arg(&gemma);
        unsafe { args.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
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
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(fail("arenaflow-rms-norm runs on CUDA only".into()))
    }
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(
            self,
            "rms_norm",
            x.dtype(),
            &x.device.clone(),
            (x, xl),
            (w, wl)
        )
    }
}

pub fn rms_norm(x: &Tensor, weight_f32: &Tensor, eps: f32, gemma: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &weight_f32.to_dtype(DType::F32)?.contiguous()?,
        &RmsNorm { eps, gemma },
    )
}

/// act(gate) * up; `kind` 0 silu, 1 gelu (tanh), 2 gelu (erf).
pub struct Gated {
    pub kind: i32,
}

impl Gated {
    fn launch<T>(
        &self,
        dev: &CudaDevice,
        (g, gl): (&CudaStorage, &Layout),
        (u, ul): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        if gl.shape() != ul.shape() {
            return Err(fail(format!("gated: {:?} vs {:?}", gl.shape(), ul.shape())));
        }
        let n = gl.shape().elem_count();
        let (gv, uv) = (view!(g, gl, T), view!(u, ul, T));
        let out = unsafe { dev.alloc::<T>(n) }?;
        let func =
            dev.get_or_load_custom_func(&format!("gated_{}", suffix(g.dtype())?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = n as u64;
        let mut args = func.builder();
        args.arg(&gv).arg(&uv).arg(&out).arg(&count).arg(&self.kind);
        unsafe { args.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            gl.shape().clone(),
        ))
    }
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "arenaflow-gated"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(fail("arenaflow-gated runs on CUDA only".into()))
    }
    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(
            self,
            "gated",
            g.dtype(),
            &g.device.clone(),
            (g, gl),
            (u, ul)
        )
    }
}

pub fn gated(gate: &Tensor, up: &Tensor, kind: i32) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &Gated { kind })
}
