//! arenaflow's custom candle ops, one per file, each with its CPU and CUDA sides together
//! (candle-nn's `ops.rs` shape): the fused attention (with its backward pass), RoPE in its
//! layout, RMSNorm, the gated activation (with its backward pass), the frozen projection
//! (no weight gradient), the end of a LoRA projection, a whole LoRA projection in training, a
//! GPTQ weight's dequantization and a backward pass's seed. The CUDA sides launch the kernels of `kernels/<op>.cu` through
//! [`crate::cuda`].

pub mod attention;
pub mod dropout;
pub mod frozen;
pub mod gated;
pub mod gptq;
pub mod lora;
pub mod lora_linear;
#[cfg(feature = "cuda")]
pub mod optim;
pub mod rms_norm;
pub mod rope;
pub mod seed;

/// Whether the fused kernels of a device kind are on: `ARENAFLOW_GPU_KERNELS` /
/// `ARENAFLOW_CPU_KERNELS` set to `off`, `0` or `false` switch to candle's composed ops.
pub fn kernels_enabled(variable: &str) -> bool {
    !matches!(
        std::env::var(variable).as_deref(),
        Ok("off") | Ok("0") | Ok("false")
    )
}

/// An element type the ops take, with its rounding from f32.
pub(crate) trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// `x` rounded to the type, saturating at its largest finite value instead of
    /// overflowing to infinity (only f16's range is narrower than f32's).
    fn from_f32_saturating(x: f32) -> Self {
        Self::from_f32(x)
    }
}

/// f16's largest finite value: Gemma-2's activations outgrow it (the residual stream after
/// its sandwich norms), so its f16 forward saturates there, as transformers' Gemma-3 fix
/// does, instead of carrying an infinity into the next norm (inf * 0 = NaN).
pub const F16_MAX: f32 = 65504.0;

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Element for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn from_f32_saturating(x: f32) -> Self {
        half::f16::from_f32(x.clamp(-F16_MAX, F16_MAX))
    }
}

/// A contiguous tensor's elements; `what` names it in the error.
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} is not contiguous"),
    }
}
