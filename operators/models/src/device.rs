//! Devices by name (`cpu`, `cuda`, `cuda:N`) and the peak memory a run used on them.
//! A requested device that is missing is an error: there is no silent CPU fallback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::Device;

use crate::error::{ModelError, Result};

/// Opens a device by name: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                ModelError::Config(format!("device {spec:?}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(ModelError::Config(format!(
                "device {spec:?}: expected cpu, cuda or cuda:N"
            )))
        }
    };
    open_cuda(spec, ordinal)
}

/// Checks a device name without opening the device.
pub fn check_device_name(spec: &str) -> Result<()> {
    let spec = spec.trim();
    let ok = spec == "cpu"
        || spec == "cuda"
        || spec
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(ModelError::Config(format!(
            "device {spec:?}: expected cpu, cuda or cuda:N"
        )))
    }
}

/// Opens GPU `ordinal` after asking the driver itself whether it can: a driver that
/// cannot start (a stub library, no GPU) is reported by its numeric error code. Formatting
/// cudarc's error instead crashed (SIGSEGV): the stub library returns codes that cudarc's
/// `CUresult` enum has no variant for, and its `Debug` jumps through a table by the code.
#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let cannot = |why: String| {
        ModelError::Config(format!(
            "device {spec}: cannot open CUDA GPU {ordinal}: {why}; the run does not fall back to the CPU"
        ))
    };
    match std::panic::catch_unwind(result::init) {
        Err(_) => {
            return Err(cannot(
                "the CUDA driver library (libcuda.so) cannot be loaded".into(),
            ))
        }
        Ok(Err(e)) => {
            return Err(cannot(format!(
                "the CUDA driver does not start ({})",
                driver_code(e.0 as u32)
            )))
        }
        Ok(Ok(())) => {}
    }
    let count = result::device::get_count().map_err(|e| {
        cannot(format!(
            "the driver cannot count its GPUs ({})",
            driver_code(e.0 as u32)
        ))
    })?;
    if ordinal >= count.max(0) as usize {
        return Err(cannot(format!("the driver sees {count} GPU(s)")));
    }
    let device = Device::new_cuda(ordinal).map_err(|e| {
        ModelError::Config(format!(
            "device {spec}: cannot open CUDA GPU {ordinal} ({e}); the run does not fall back to the CPU"
        ))
    })?;
    if let Device::Cuda(cuda) = &device {
        // cudarc creates two CUDA events with every allocation (and destroys them with it)
        // to order uses across streams, but only waits on them once a context has streams
        // of its own; candle's device works on the one per-thread default stream, so they
        // are never used, and every tensor candle makes pays for them.
        // SAFETY: no arenaflow code makes a second stream on this context; with one stream
        // the events are never read, so turning them off changes no ordering.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

/// A CUDA driver error code by number, with its name where it is one a user meets here.
#[cfg(feature = "cuda")]
fn driver_code(code: u32) -> String {
    let name = match code {
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        34 => "CUDA_ERROR_STUB_LIBRARY: the driver library is a stub, not a driver",
        35 => "CUDA_ERROR_INSUFFICIENT_DRIVER: the driver is older than this build's CUDA",
        46 => "CUDA_ERROR_DEVICES_UNAVAILABLE",
        100 => "CUDA_ERROR_NO_DEVICE: no GPU is visible (CUDA_VISIBLE_DEVICES?)",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        _ => "",
    };
    if code > 999 {
        format!("{code}, which is no CUDA error code: the driver library is likely the toolkit's stub, not a driver")
    } else if name.is_empty() {
        format!("driver error {code}")
    } else {
        format!("driver error {code}, {name}")
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device> {
    Err(ModelError::Config(format!(
        "device {spec}: this arenaflow was built without CUDA (cargo build --features cuda; scripts/build-cuda.sh); the run does not fall back to the CPU"
    )))
}

/// The name a device is reported under.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// The highest device memory in use seen by [`sample_memory`] since [`reset_peak`].
static CUDA_PEAK: AtomicU64 = AtomicU64::new(0);

/// Set by [`reset_peak`]: the memory pool's high-water mark is reset at the next sample.
static POOL_RESET: AtomicBool = AtomicBool::new(false);

/// Notes the GPU memory in use now (all of the device's, as nvidia-smi counts it). The
/// forward pass samples once per layer, when the layer's intermediates are alive. A no-op
/// on the CPU.
pub fn sample_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if POOL_RESET.swap(false, Ordering::Relaxed) {
            pool::reset_high(cuda);
        }
        if let Ok((free, total)) = cuda.cuda_stream().context().mem_get_info() {
            CUDA_PEAK.fetch_max((total - free) as u64, Ordering::Relaxed);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

pub fn reset_peak() {
    CUDA_PEAK.store(0, Ordering::Relaxed);
    POOL_RESET.store(true, Ordering::Relaxed);
}

/// The most memory candle's allocations held at once on a GPU (since the first sample after
/// [`reset_peak`]): the high-water mark of the device's default memory pool, which cudarc's
/// stream-ordered allocations come from, as torch's `max_memory_allocated`. [`peak_memory`]
/// counts the device's memory in use: this, what the pool keeps reserved between
/// synchronisations, the context and cuBLAS's workspaces. None on the CPU.
pub fn peak_allocated(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return pool::used_high(cuda);
    }
    let _ = device;
    None
}

/// The default memory pool of a CUDA device, through the driver API.
#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    fn default_pool(cuda: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let ctx = cuda.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device of a bound context; the driver writes one handle.
        let status = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (status == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    /// The pool's USED_MEM_HIGH through `access` (get or set; a cuuint64_t), true where
    /// the driver took the call.
    fn used_mem_high(
        cuda: &CudaDevice,
        value: &mut u64,
        access: unsafe fn(
            sys::CUmemoryPool,
            sys::CUmemPool_attribute,
            *mut std::ffi::c_void,
        ) -> sys::CUresult,
    ) -> bool {
        let Some(pool) = default_pool(cuda) else {
            return false;
        };
        let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t, read or written by the driver.
        let status = unsafe { access(pool, attribute, (value as *mut u64).cast()) };
        status == sys::CUresult::CUDA_SUCCESS
    }

    pub(super) fn used_high(cuda: &CudaDevice) -> Option<u64> {
        let mut high = 0;
        (used_mem_high(cuda, &mut high, sys::cuMemPoolGetAttribute) && high > 0).then_some(high)
    }

    /// Setting USED_MEM_HIGH takes only 0: the mark restarts at the current use.
    pub(super) fn reset_high(cuda: &CudaDevice) {
        used_mem_high(cuda, &mut 0, sys::cuMemPoolSetAttribute);
    }
}

/// Peak memory in bytes: GPU memory in use at its highest sample on a GPU; the process's
/// peak resident memory (VmHWM) on the CPU.
pub fn peak_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => std::fs::read_to_string("/proc/self/status")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024),
        _ => Some(CUDA_PEAK.load(Ordering::Relaxed)).filter(|&p| p > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_by_name() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let bad = parse_device("gpu0").unwrap_err().to_string();
        assert!(bad.contains("expected cpu, cuda or cuda:N"), "{bad}");
        assert!(parse_device("cuda:x").is_err());
        if !cfg!(feature = "cuda") {
            let missing = parse_device("cuda:0").unwrap_err().to_string();
            assert!(missing.contains("built without CUDA"), "{missing}");
        }
        assert!(peak_memory(&Device::Cpu).unwrap_or(0) > 0);
    }
}
