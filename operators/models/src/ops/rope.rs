//! Rotary position embedding over (b, s, heads, d), the layout of the fused attention, as an
//! op with a backward pass: the rotation by the negated angle (sin negated). Training runs it
//! where it runs the fused attention (a GPU); inference keeps candle's `rope_thd`. The CUDA
//! side is `kernels/rope.cu`; the CPU side computes the same (for the tests).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

use super::{contiguous, Element};

/// y_i = x_i cos - x_{i+d/2} sin, y_{i+d/2} = x_{i+d/2} cos + x_i sin (i < d/2), with cos and
/// sin (s, d/2) in the element type of x; `sign` -1 negates sin.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub sign: f32,
}

impl Rope {
    /// (s, heads, d) of x, checked against the tables.
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (_, s, heads, d) = layout.shape().dims4()?;
        if d % 2 != 0 || self.cos.dims() != [s, d / 2] || self.sin.dims() != [s, d / 2] {
            candle_core::bail!(
                "rope: x {:?} does not fit cos {:?} / sin {:?}",
                layout.shape(),
                self.cos.dims(),
                self.sin.dims()
            );
        }
        Ok((s, heads, d))
    }

    fn cpu<T: Element>(
        &self,
        x: &[T],
        tables: (&[T], &[T]),
        dims: (usize, usize, usize),
    ) -> Vec<T> {
        let ((cos, sin), (s, heads, d)) = (tables, dims);
        let half = d / 2;
        let mut out = vec![T::from_f32(0.0); x.len()];
        for (vec, (xs, ys)) in x.chunks(d).zip(out.chunks_mut(d)).enumerate() {
            let pos = (vec / heads) % s;
            for c in 0..half {
                let cs = cos[pos * half + c].to_f32();
                let sn = self.sign * sin[pos * half + c].to_f32();
                let (a, b) = (xs[c].to_f32(), xs[c + half].to_f32());
                ys[c] = T::from_f32(a * cs - b * sn);
                ys[c + half] = T::from_f32(b * cs + a * sn);
            }
        }
        out
    }
}

/// A table's CPU elements.
fn cpu_table<T: Element>(table: &Tensor, pick: fn(&CpuStorage) -> Option<&[T]>) -> Result<Vec<T>> {
    let (storage, layout) = table.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("rope: the tables are not on the CPU");
    };
    let Some(data) = pick(cpu) else {
        candle_core::bail!("rope: the tables' dtype {:?} is not x's", cpu.dtype());
    };
    Ok(contiguous(data, layout, "rope: table")?.to_vec())
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "arenaflow-rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(layout)?;
        let out = match x {
            CpuStorage::F32(x) => {
                fn pick(c: &CpuStorage) -> Option<&[f32]> {
                    match c {
                        CpuStorage::F32(v) => Some(v),
                        _ => None,
                    }
                }
                let (cos, sin) = (cpu_table(&self.cos, pick)?, cpu_table(&self.sin, pick)?);
                CpuStorage::F32(self.cpu(contiguous(x, layout, "rope: x")?, (&cos, &sin), dims))
            }
            CpuStorage::BF16(x) => {
                fn pick(c: &CpuStorage) -> Option<&[half::bf16]> {
                    match c {
                        CpuStorage::BF16(v) => Some(v),
                        _ => None,
                    }
                }
                let (cos, sin) = (cpu_table(&self.cos, pick)?, cpu_table(&self.sin, pick)?);
                CpuStorage::BF16(self.cpu(contiguous(x, layout, "rope: x")?, (&cos, &sin), dims))
            }
            other => candle_core::bail!("rope on the CPU: dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::by_dtype!(self, "rope", x.dtype(), &x.device.clone(), (x, layout))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rope_thd_signed(
            grad, &self.cos, &self.sin, -self.sign,
        )?))
    }
}

#[cfg(feature = "cuda")]
impl Rope {
    fn launch<T>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        (x, layout): (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use crate::cuda::{fail, launch, suffix, view, ROPE};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (s, heads, d) = self.dims(layout)?;
        let (cos_storage, cos_layout) = self.cos.storage_and_layout();
        let (sin_storage, sin_layout) = self.sin.storage_and_layout();
        let (Storage::Cuda(cos), Storage::Cuda(sin)) = (&*cos_storage, &*sin_storage) else {
            return Err(fail("rope: the tables must be on the GPU".into()));
        };
        let (cos, sin) = (view!(cos, cos_layout, T), view!(sin, sin_layout, T));
        let xv = view!(x, layout, T);
        let n = layout.shape().elem_count();
        // SAFETY: the kernel writes every element (each pair of x once).
        let out = unsafe { dev.alloc::<T>(n) }?;
        let pairs = n / 2;
        let cfg = LaunchConfig {
            grid_dim: (pairs.div_ceil(256).min(65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (si, hi, di) = (s as i32, heads as i32, d as i32);
        // SAFETY: rope_thd_* take (x, cos, sin, out, s, heads, d, pairs, sign) over the
        // contiguous layouts checked by dims.
        launch!(dev, ROPE, format!("rope_thd_{}", suffix(x.dtype())?), cfg;
            &xv, &cos, &sin, &out, &si, &hi, &di, &pairs, &self.sign);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            layout.shape().clone(),
        ))
    }
}

fn rope_thd_signed(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.clone(),
        sin: sin.clone(),
        sign,
    })
}

/// x (b, s, heads, d) rotated by the positions' angles, differentiable.
pub fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_thd_signed(x, cos, sin, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SplitMix64;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = SplitMix64::new(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.next_normal() as f32).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// The forward is candle's `rope_thd`; the backward is autograd's through candle's
    /// composed `rope_slow` (over the (b, heads, s, d) layout).
    #[test]
    fn rope_matches_candle_forward_and_backward() {
        let (b, s, h, d) = (2, 7, 3, 8);
        let x = Var::from_tensor(&random(&[b, s, h, d], 1)).unwrap();
        let angles = random(&[s, d / 2], 2);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let ours = rope_thd(x.as_tensor(), &cos, &sin).unwrap();
        let candle = candle_nn::rotary_emb::rope_thd(x.as_tensor(), &cos, &sin).unwrap();
        let diff = (&ours - &candle).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);

        let upstream = random(&[b, s, h, d], 3);
        let grad_of = |y: &Tensor| {
            let store = (y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            store.get(x.as_tensor()).unwrap().clone()
        };
        let ours = grad_of(&ours);
        let slow =
            candle_nn::rotary_emb::rope_slow(&x.as_tensor().transpose(1, 2).unwrap(), &cos, &sin)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
        let reference = grad_of(&slow);
        let diff = (&ours - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
