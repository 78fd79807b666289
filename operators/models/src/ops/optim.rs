//! AdamW's update of an f32 tensor on the GPU in three in-place passes (`kernels/optim.cu`):
//! the first moment, the second, then the parameter, instead of a dozen composed ops and
//! their temporaries per tensor. The CPU keeps the composed ops of `train/optim.rs`.

use candle_core::{CpuStorage, CudaStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use crate::cuda::{fail, launch, OPTIM};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

/// One AdamW step's scalars (see [`crate::train::optim::AdamW::step`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    /// 1 - lr * weight_decay.
    pub decay: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// lr / (1 - beta1^t).
    pub step_size: f32,
}

const CPU: &str = "the fused AdamW runs on a GPU; the CPU steps through the composed ops";

/// The first (`second` false) or second moment, updated in place from the gradient.
struct Moment {
    step: AdamWStep,
    second: bool,
}
struct Param(AdamWStep);

fn config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A contiguous f32 source's view.
macro_rules! source {
    ($src:expr) => {{
        let (storage, layout): (&CudaStorage, &Layout) = $src;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| fail("AdamW: a source is not contiguous".into()))?;
        storage.as_cuda_slice::<f32>()?.slice(start..end)
    }};
}

/// The destination's (slice, element count), checked against the sources' counts.
fn destination<'a>(
    dst: &'a mut CudaStorage,
    layout: &Layout,
    sources: &[&Layout],
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>,
    usize,
)> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| fail("AdamW: the destination is not contiguous".into()))?;
    for l in sources {
        if l.shape().elem_count() != end - start {
            return Err(fail(format!(
                "AdamW: {:?} against a destination of {} elements",
                l.shape(),
                end - start
            )));
        }
    }
    Ok((
        dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end),
        end - start,
    ))
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        if self.second {
            "arenaflow-adamw-exp-avg-sq"
        } else {
            "arenaflow-adamw-exp-avg"
        }
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("{CPU}")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let dev = dst.device.clone();
        let g = source!((g, gl));
        let (mut moment, n) = destination(dst, dst_l, &[gl])?;
        let s = self.step;
        if self.second {
            let c = 1.0 - s.beta2;
            // SAFETY: adamw_exp_avg_sq takes (v, g, n, beta2, 1 - beta2) over n elements.
            launch!(dev, OPTIM, "adamw_exp_avg_sq", config(n); &mut moment, &g, &n, &s.beta2, &c);
        } else {
            let c = 1.0 - s.beta1;
            // SAFETY: adamw_exp_avg takes (m, g, n, 1 - beta1) over n elements of each.
            launch!(dev, OPTIM, "adamw_exp_avg", config(n); &mut moment, &g, &n, &c);
        }
        Ok(())
    }
}

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "arenaflow-adamw-param"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("{CPU}")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (m, v) = ((ms, ml), (vs, vl));
        let dev = dst.device.clone();
        let (mv, vv) = (source!(m), source!(v));
        let (mut p, n) = destination(dst, dst_l, &[m.1, v.1])?;
        let s = self.0;
        // SAFETY: adamw_param takes (p, m, v, n, decay, bias_correction2_sqrt, eps,
        // step_size) over n elements of each.
        launch!(dev, OPTIM, "adamw_param", config(n);
            &mut p, &mv, &vv, &n, &s.decay, &s.bias_correction2_sqrt, &s.eps, &s.step_size);
        Ok(())
    }
}

/// One AdamW step of `param` (f32, on a GPU) and its moments, in place.
pub fn adamw_step(
    param: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: &Tensor,
    step: AdamWStep,
) -> Result<()> {
    let grad = grad.contiguous()?;
    exp_avg.inplace_op2(
        &grad,
        &Moment {
            step,
            second: false,
        },
    )?;
    exp_avg_sq.inplace_op2(&grad, &Moment { step, second: true })?;
    param.inplace_op3(exp_avg, exp_avg_sq, &Param(step))
}

/// Each f32 tensor's sum of squares (all on one GPU): one launch per tensor into one buffer,
/// one copy back. The gradient norm of clipping without a dozen composed ops per tensor.
pub fn sums_of_squares(tensors: &[Tensor]) -> Result<Vec<f32>> {
    let Some(first) = tensors.first() else {
        return Ok(Vec::new());
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        return Err(fail("sums_of_squares: the tensors are not on a GPU".into()));
    };
    let mut sums = dev.alloc_zeros::<f32>(tensors.len())?;
    for (slot, t) in tensors.iter().enumerate() {
        let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(storage) = &*storage else {
            return Err(fail("sums_of_squares: a tensor is not on the GPU".into()));
        };
        let values = source!((storage, layout));
        let (n, slot) = (layout.shape().elem_count(), slot as i32);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sum_squares takes (g, n, sums, slot): n elements of g, slot < sums' length.
        launch!(dev, OPTIM, "sum_squares", cfg; &values, &n, &mut sums, &slot);
    }
    dev.clone_dtoh(&sums)
}
