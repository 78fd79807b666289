//! Loading arenaflow's PTX modules (kernels/*.cu, one per op, built by build.rs) and the
//! helpers every launch uses. It imports no op: each op in [`crate::ops`] launches its own
//! kernels through these.

use candle_core::{DType, Result};

/// One compiled kernel source.
#[derive(Clone, Copy)]
pub(crate) struct Module {
    pub(crate) name: &'static str,
    pub(crate) ptx: &'static str,
}

pub(crate) const ATTENTION: Module = Module {
    name: "arenaflow_attention",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
};
pub(crate) const ATTENTION_BACKWARD: Module = Module {
    name: "arenaflow_attention_backward",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention_backward.ptx")),
};
pub(crate) const ROPE: Module = Module {
    name: "arenaflow_rope",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rope.ptx")),
};
pub(crate) const DROPOUT: Module = Module {
    name: "arenaflow_dropout",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")),
};
pub(crate) const OPTIM: Module = Module {
    name: "arenaflow_optim",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/optim.ptx")),
};
pub(crate) const RMS_NORM: Module = Module {
    name: "arenaflow_rms_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx")),
};
pub(crate) const LORA: Module = Module {
    name: "arenaflow_lora",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/lora.ptx")),
};
pub(crate) const GPTQ: Module = Module {
    name: "arenaflow_gptq",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/gptq.ptx")),
};
pub(crate) const GATED: Module = Module {
    name: "arenaflow_gated",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/gated.ptx")),
};

/// Launches kernel `name` of `module` (loaded on first use, cached by the device) with
/// `cfg` and the arguments in order. The caller answers for the arguments matching the
/// kernel's signature and the grid covering only memory the arguments own.
macro_rules! launch {
    ($dev:expr, $module:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        use candle_core::cuda_backend::WrapErr as _;
        let module: $crate::cuda::Module = $module;
        let cfg: candle_core::cuda_backend::cudarc::driver::LaunchConfig = $cfg;
        let func = $dev.get_or_load_custom_func(&$name, module.name, module.ptx)?;
        let mut args = func.builder();
        $( args.arg($arg); )*
        // SAFETY: see the macro's contract above; every call site states its own.
        unsafe { args.launch(cfg) }.w()?;
    }};
}
pub(crate) use launch;

/// Lets kernel `name` of `module` take `bytes` of dynamic shared memory a block: past
/// 48 KiB a function must ask for it (an H200 gives up to 227 KiB).
pub(crate) fn allow_shared(
    dev: &candle_core::CudaDevice,
    module: Module,
    name: &str,
    bytes: u32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attribute;
    use candle_core::cuda_backend::WrapErr as _;
    if bytes <= 48 * 1024 {
        return Ok(());
    }
    let func = dev.get_or_load_custom_func(name, module.name, module.ptx)?;
    func.set_attribute(
        Attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()?;
    Ok(())
}

/// The launch of an element-wise grid-stride kernel over `n` elements: 256 threads a block,
/// at most 16 blocks per SM of an H100/H200 (132), at least one.
pub(crate) fn grid_stride(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of 256 threads per row: the RMSNorm kernels' launch. Every one of them takes
/// it, so that a row's sums run in the same order in each (`add_rms_norm_*` gives
/// `rms_norm_*`'s bits).
pub(crate) fn per_row(rows: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn fail(message: String) -> candle_core::Error {
    candle_core::Error::Cuda(message.into())
}

/// The kernel-name suffix of an element type.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
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
            candle_core::DType::BF16 => $op.launch::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $op.launch::<half::f16>($($arg),*),
            candle_core::DType::F32 => $op.launch::<f32>($($arg),*),
            other => Err($crate::cuda::fail(format!("{}: dtype {other:?}", $what))),
        }
    };
}
pub(crate) use by_dtype;

/// A contiguous tensor's slice of its storage, as a kernel argument.
macro_rules! view {
    ($storage:expr, $layout:expr, $t:ty) => {{
        let (start, end) = $layout
            .contiguous_offsets()
            .ok_or_else(|| $crate::cuda::fail("arenaflow kernels need contiguous inputs".into()))?;
        $storage.as_cuda_slice::<$t>()?.slice(start..end)
    }};
}
pub(crate) use view;
