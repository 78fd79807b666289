//! Data-parallel gradients summed between GPUs by NCCL: [`NcclCollective`] all-reduces a
//! step's gradients on the devices (one `ncclAllReduce` over them end to end, f32) and
//! keeps its host collective (TCP through rank 0) for the step's few scalars: loss terms,
//! row logits, counts. Rank 0's NCCL id reaches the others through that host collective.
//!
//! libnccl is opened at run time (`libloading`), not linked: the CUDA binary starts where
//! no NCCL is installed and single-GPU runs never need it. cudarc's `nccl` feature would
//! link it into every CUDA build (its `dynamic-linking` is one switch for all of CUDA's
//! libraries), so the five entry points used here are declared by hand, from nccl.h.
//!
//! Sums by NCCL are not in rank order: with two ranks they are the same bits as the host's
//! sum (a + b = b + a), with more they agree within f32 rounding.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::collective::{from_rank_zero, Collective};
use crate::error::{ModelError, Result};

/// nccl.h's `ncclUniqueId`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// nccl.h's `ncclComm_t`, `ncclResult_t` (0: success), `ncclFloat32`, `ncclSum`.
type Comm = *mut c_void;
type NcclResult = c_int;
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

/// The library and the entry points used.
struct Nccl {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> NcclResult,
    /// ncclCommAbort: unlike ncclCommDestroy it does not wait for work a dead peer will
    /// never finish.
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

/// The communicator, used from the thread that trains.
struct Communicator(Comm);
// SAFETY: NCCL's communicators may be used from any thread, one call at a time; the
// trainer's collective is behind a mutex.
unsafe impl Send for Communicator {}
unsafe impl Sync for Communicator {}

impl Nccl {
    /// `ARENAFLOW_NCCL_LIBRARY`, else `libnccl.so.2` on the loader's path (the
    /// nvidia-nccl-cu13 wheel's `lib` folder, as PyTorch's own).
    fn open() -> Result<Self> {
        let path =
            std::env::var("ARENAFLOW_NCCL_LIBRARY").unwrap_or_else(|_| "libnccl.so.2".into());
        let fail = |what: String| ModelError::Config(format!("NCCL ({path}): {what}"));
        // SAFETY: loading NCCL runs its initialisers, which are sound to run once.
        let library = unsafe { libloading::Library::new(&path) }.map_err(|e| {
            fail(format!(
                "{e}; put the nvidia-nccl-cu13 wheel's lib folder on LD_LIBRARY_PATH or name the \
                 library in ARENAFLOW_NCCL_LIBRARY"
            ))
        })?;
        // Never unloaded: NCCL's bootstrap threads may outlive a failed join.
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        macro_rules! symbol {
            ($name:literal) => {
                // SAFETY: the type is the entry point's in nccl.h; the library is never
                // unloaded.
                *unsafe { library.get($name) }.map_err(|e| fail(e.to_string()))?
            };
        }
        Ok(Self {
            get_unique_id: symbol!(b"ncclGetUniqueId\0"),
            comm_init_rank: symbol!(b"ncclCommInitRank\0"),
            all_reduce: symbol!(b"ncclAllReduce\0"),
            comm_abort: symbol!(b"ncclCommAbort\0"),
            error_string: symbol!(b"ncclGetErrorString\0"),
        })
    }

    fn check(&self, what: &str, result: NcclResult) -> Result<()> {
        if result == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result code.
        let text = unsafe { CStr::from_ptr((self.error_string)(result)) };
        Err(ModelError::Config(format!(
            "NCCL {what}: {} (result {result})",
            text.to_string_lossy()
        )))
    }
}

/// Sums tensors between GPUs with NCCL; everything else through its host collective.
pub struct NcclCollective {
    host: Box<dyn Collective>,
    nccl: Arc<Nccl>,
    comm: Arc<Communicator>,
}

impl NcclCollective {
    /// Opens NCCL and joins the ranks of `host` on `device` (this rank's GPU). Every rank
    /// first says whether it is ready (NCCL opened, the GPU bound, `wanted`), and rank 0
    /// whether it made the id: where one is not, every rank gets the error back with
    /// `host`, to carry on with it alone (no rank waits for another's NCCL). Every rank
    /// takes part in both exchanges, `wanted` or not.
    #[allow(clippy::result_large_err)]
    pub fn join(
        mut host: Box<dyn Collective>,
        device: &Device,
        wanted: bool,
    ) -> std::result::Result<Self, (ModelError, Box<dyn Collective>)> {
        match Self::handshake(host.as_mut(), device, wanted) {
            Ok((nccl, comm)) => Ok(Self {
                host,
                nccl: Arc::new(nccl),
                comm: Arc::new(Communicator(comm)),
            }),
            Err(e) => Err((e, host)),
        }
    }

    fn handshake(host: &mut dyn Collective, device: &Device, wanted: bool) -> Result<(Nccl, Comm)> {
        let opened = match device {
            Device::Cuda(cuda) if wanted => Nccl::open().and_then(|nccl| {
                cuda.cuda_stream()
                    .context()
                    .bind_to_thread()
                    .map_err(|e| ModelError::Config(format!("NCCL: binding the GPU: {e}")))?;
                Ok(nccl)
            }),
            Device::Cuda(_) => Err(ModelError::Config("NCCL: off on this rank".into())),
            _ => Err(ModelError::Config("NCCL: the device is not a GPU".into())),
        };
        let mut ready = [if opened.is_ok() { 1.0 } else { 0.0 }];
        host.all_reduce_sum(&mut ready)?;
        let world = host.world();
        let nccl = opened?;
        if ready[0] as usize != world {
            let missing = world - ready[0] as usize;
            return Err(ModelError::Config(format!(
                "NCCL: {missing} of {world} ranks could not open it or bind their GPU"
            )));
        }
        let rank = host.rank();
        let mut id = UniqueId { internal: [0; 128] };
        let mut made = Ok(());
        if rank == 0 {
            // SAFETY: NCCL writes one id.
            made = nccl.check("ncclGetUniqueId", unsafe { (nccl.get_unique_id)(&mut id) });
        }
        // The id and, last, whether rank 0 made it: every rank takes part either way.
        let mut bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        bytes.push(u8::from(made.is_ok()));
        let shared = from_rank_zero(host, &bytes)?;
        made?;
        if shared[128] == 0 {
            return Err(ModelError::Config(
                "NCCL: rank 0 could not make the id".into(),
            ));
        }
        for (slot, &b) in id.internal.iter_mut().zip(&shared) {
            *slot = b as c_char;
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: every rank passes the same id and world, each its own rank, with its GPU's
        // context current; NCCL writes the communicator.
        let init = unsafe { (nccl.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        nccl.check("ncclCommInitRank", init)?;
        Ok((nccl, comm))
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if Arc::strong_count(&self.comm) == 1 {
            // SAFETY: the communicator is not used after this. Abort, not destroy: after a
            // peer died an all-reduce may be queued that will never finish.
            let _ = unsafe { (self.nccl.comm_abort)(self.comm.0) };
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum(values)
    }

    /// One all-reduce over the tensors end to end in f32, each tensor back in its shape
    /// and dtype.
    fn all_reduce_tensors(&mut self, tensors: &mut [Tensor]) -> Result<bool> {
        if tensors.is_empty() {
            return Ok(true);
        }
        let flat = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let summed = Tensor::cat(&flat, 0)?.apply_op1_no_bwd(&AllReduce {
            nccl: self.nccl.clone(),
            comm: self.comm.clone(),
        })?;
        let mut at = 0;
        for t in tensors.iter_mut() {
            let n = t.elem_count();
            *t = summed
                .narrow(0, at, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            at += n;
        }
        Ok(true)
    }
}

/// The sum over the ranks of a contiguous f32 tensor, into a new one, on the device's
/// stream.
struct AllReduce {
    nccl: Arc<Nccl>,
    comm: Arc<Communicator>,
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "arenaflow-nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce: the tensor is on the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let n = l.shape().elem_count();
        let input = crate::cuda::view!(s, l, f32);
        // SAFETY: NCCL writes all n elements.
        let mut output = unsafe { dev.alloc::<f32>(n) }?;
        let stream = dev.cuda_stream();
        {
            let (send, _read) = input.device_ptr(&stream);
            let (recv, _write) = output.device_ptr_mut(&stream);
            // SAFETY: n f32 on this rank's GPU each, on its stream; the communicator is this
            // run's, used one call at a time.
            let result = unsafe {
                (self.nccl.all_reduce)(
                    send as *const c_void,
                    recv as *mut c_void,
                    n,
                    FLOAT32,
                    SUM,
                    self.comm.0,
                    stream.cu_stream() as *mut c_void,
                )
            };
            self.nccl
                .check("ncclAllReduce", result)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        Ok((CudaStorage::wrap_cuda_slice(output, dev), l.shape().clone()))
    }
}
