//! AdamW over every trainable tensor in one launch and the gradient norm's squared sums in
//! another (`kernels/optim.cu`), through a table of device pointers: a step of a model with
//! hundreds of LoRA tensors costs two launches and one small copy of the table, instead of
//! four launches per tensor (and one pass more per tensor when clipping). The CPU keeps the
//! composed ops of `train/optim.rs`.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Result, Storage, Tensor};

use crate::cuda::{fail, launch, OPTIM};

/// One AdamW step's scalars (see [`crate::train::optim::AdamW::step`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub decay: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    pub step_size: f32,
    /// Every gradient is multiplied by this first (clipping's coefficient; 1: as it is).
    pub grad_scale: f32,
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(dev) => Ok(dev.clone()),
        _ => Err(fail("AdamW: a tensor is not on a GPU".into())),
    }
}

/// The device address of `t`'s first element and its length; `t` must be f32, contiguous
/// and on `dev`. The address stays valid while `t` lives: frees are ordered on the stream,
/// after the launches that read it.
fn address(dev: &CudaDevice, t: &Tensor, what: &str) -> Result<(u64, u64)> {
    if t.dtype() != DType::F32 {
        return Err(fail(format!("AdamW: {what} is {:?}, not f32", t.dtype())));
    }
    if !t.device().same_device(&Device::Cuda(dev.clone())) {
        return Err(fail(format!("AdamW: {what} is on another device")));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        return Err(fail(format!("AdamW: {what} is not on a GPU")));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| fail(format!("AdamW: {what} is not contiguous")))?;
    let stream = dev.cuda_stream();
    let (base, _sync) = storage.as_cuda_slice::<f32>()?.device_ptr(&stream);
    Ok((
        base + (start * std::mem::size_of::<f32>()) as u64,
        (end - start) as u64,
    ))
}

/// One AdamW step of every `params[i]` (f32 variables on one GPU) from `grads[i]` and the
/// moments, in place, in one launch.
pub fn adamw_step_all(
    params: &[Tensor],
    exp_avg: &[Tensor],
    exp_avg_sq: &[Tensor],
    grads: &[Tensor],
    step: AdamWStep,
) -> Result<()> {
    let count = params.len();
    if count == 0 {
        return Ok(());
    }
    if exp_avg.len() != count || exp_avg_sq.len() != count || grads.len() != count {
        return Err(fail(format!(
            "AdamW: {count} parameters, {} first moments, {} second moments, {} gradients",
            exp_avg.len(),
            exp_avg_sq.len(),
            grads.len()
        )));
    }
    let dev = cuda_device(&params[0])?;
    // Gradients of another type or layout become f32 copies, alive until after the launch.
    let grads = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let mut table = Vec::with_capacity(4 * count);
    let mut lens = Vec::with_capacity(count);
    for p in params {
        let (address_p, n) = address(&dev, p, "a parameter")?;
        table.push(address_p);
        lens.push(n);
    }
    for (set, what) in [
        (exp_avg, "a first moment"),
        (exp_avg_sq, "a second moment"),
        (&grads[..], "a gradient"),
    ] {
        for (i, t) in set.iter().enumerate() {
            let (a, n) = address(&dev, t, what)?;
            if n != lens[i] {
                return Err(fail(format!(
                    "AdamW: {what} of {n} elements against a parameter of {}",
                    lens[i]
                )));
            }
            table.push(a);
        }
    }
    let longest = lens.iter().copied().max().unwrap_or(0) as usize;
    let table = dev.clone_htod(&table)?;
    let lens = dev.clone_htod(&lens)?;
    let cfg = LaunchConfig {
        grid_dim: (longest.div_ceil(256).clamp(1, 1024) as u32, count as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let s = step;
    let (count, one_minus_beta1, one_minus_beta2) = (count as i32, 1.0 - s.beta1, 1.0 - s.beta2);
    // SAFETY: adamw_multi takes (table, lens, count, grad_scale, 1 - beta1, beta2, 1 - beta2,
    // decay, bias_correction2_sqrt, eps, step_size); the table holds 4 x count addresses of
    // f32 tensors of lens[t] elements each, alive until the launch has run (see `address`).
    launch!(dev, OPTIM, "adamw_multi", cfg;
        &table, &lens, &count, &s.grad_scale, &one_minus_beta1, &s.beta2, &one_minus_beta2,
        &s.decay, &s.bias_correction2_sqrt, &s.eps, &s.step_size);
    Ok(())
}

/// Each f32 tensor's sum of squares (all on one GPU): one launch over a table of the
/// tensors, one copy back. The gradient norm of clipping without a dozen composed ops per
/// tensor.
pub fn sums_of_squares(tensors: &[Tensor]) -> Result<Vec<f32>> {
    let Some(first) = tensors.first() else {
        return Ok(Vec::new());
    };
    let dev = cuda_device(first)?;
    let tensors = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let mut table = Vec::with_capacity(tensors.len());
    let mut lens = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let (a, n) = address(&dev, t, "a gradient")?;
        table.push(a);
        lens.push(n);
    }
    let table = dev.clone_htod(&table)?;
    let lens = dev.clone_htod(&lens)?;
    let mut sums = dev.alloc_zeros::<f32>(tensors.len())?;
    let cfg = LaunchConfig {
        grid_dim: (tensors.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sum_squares_multi takes (table, lens, sums): one block per tensor of the table
    // (f32, lens[t] elements, alive until the copy back below has waited for the launch).
    launch!(dev, OPTIM, "sum_squares_multi", cfg; &table, &lens, &mut sums);
    dev.clone_dtoh(&sums)
}
