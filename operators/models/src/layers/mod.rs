//! The layers of the decoder, one per file, each `new(cfg, vb)` + `forward_t(xs, train)`:
//! the linear projection with its LoRA ([`linear`]), RMSNorm ([`rms_norm`]), the gated MLP
//! ([`mlp`]), self-attention ([`attention`]) and RoPE ([`rope`]). [`BatchState`] is what
//! every layer of one forward pass shares: the rope tables and the padding (as row spans for
//! the fused attention, as masks for the composed one). Training and inference run the same
//! layers; `train` switches dropout on, and off the fused kernels that have no backward pass
//! (all but the GPU's attention and RoPE).

pub mod attention;
pub mod decoder_layer;
pub mod dropout;
pub mod linear;
pub mod mlp;
pub mod rms_norm;
pub mod rope;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::models::batch::pool_positions;
use crate::models::{DecoderConfig, PaddedBatch};
use crate::ops::kernels_enabled;

/// Which kernels the model runs in inference, decided once at load from the device, the
/// dtype and `ARENAFLOW_GPU_KERNELS` / `ARENAFLOW_CPU_KERNELS`. Training runs the composed
/// ops but for the GPU's attention (and its RoPE), which has a backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// The fused attention op (GPU, or the blocked CPU one for f32).
    pub attention: bool,
    /// arenaflow's GPU kernels for RMSNorm and the gated activation too.
    pub gpu: bool,
    /// The residual add and the RMSNorm after it in one pass (GPU inference, unless
    /// `ARENAFLOW_ADD_NORM=off`; `RmsNorm::add_forward_t`).
    pub add_norm: bool,
}

impl Kernels {
    pub fn resolve(device: &Device, dtype: DType) -> Self {
        if device.is_cuda() {
            let on = cfg!(feature = "cuda") && kernels_enabled("ARENAFLOW_GPU_KERNELS");
            Self {
                attention: on,
                gpu: on,
                add_norm: on && kernels_enabled("ARENAFLOW_ADD_NORM"),
            }
        } else {
            Self {
                attention: device.is_cpu()
                    && dtype == DType::F32
                    && kernels_enabled("ARENAFLOW_CPU_KERNELS"),
                gpu: false,
                add_norm: false,
            }
        }
    }

    /// Candle's composed ops everywhere.
    pub fn composed() -> Self {
        Self {
            attention: false,
            gpu: false,
            add_norm: false,
        }
    }
}

/// How one forward pass masks attention.
#[derive(Debug, Clone)]
pub enum Masking {
    /// The fused op: each row's real span, (rows, 2) u32 of start, end.
    Spans(Tensor),
    /// The composed ops: additive masks (rows x 1 x s x s) for full and, where some layer
    /// slides, windowed attention.
    Masks {
        full: Tensor,
        sliding: Option<Tensor>,
    },
}

/// What every layer of one forward pass shares.
#[derive(Debug, Clone)]
pub struct BatchState {
    pub rows: usize,
    pub seq_len: usize,
    /// RoPE cos and sin of every position (seq_len x head_dim / 2), in the model dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    pub masking: Masking,
    /// Each row's pooled position: its last token that is not the pad token.
    pub pool: Vec<usize>,
}

impl BatchState {
    /// The state of `batch`: pooled positions, rope tables from `rope`, and spans where the fused attention
    /// runs (`kernels.attention` in inference, or in training on a GPU; every row's real tokens in one span) or
    /// masks where the composed ops do. On a GPU, rows that are not one span are an error.
    pub fn new(
        cfg: &DecoderConfig,
        rope: &rope::Rope,
        kernels: Kernels,
        batch: &PaddedBatch,
        train: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // Pooling is checked first: rows without a pad token fail before any work.
        let pool = pool_positions(batch, cfg.pad_token_id)?;
        let (cos, sin) = rope.tables(batch.seq_len, dtype, device)?;
        // Training runs the fused attention where it has a backward pass (a GPU).
        let spans = if kernels.attention && (!train || device.is_cuda()) {
            row_spans(batch, device.is_cuda())?
        } else {
            None
        };
        let masking = match spans {
            Some(spans) => Masking::Spans(Tensor::from_vec(spans, (batch.rows, 2), device)?),
            None => {
                // Scores are masked in f32 (f64 for an f64 model, as gradient checks need).
                let mask_dtype = crate::models::adapter_dtype(dtype);
                let sliding = match &cfg.sliding_window {
                    Some(w) if w.layers.iter().any(|&s| s) => Some(
                        attention::attention_mask(batch, Some(w.size), device)?
                            .to_dtype(mask_dtype)?,
                    ),
                    _ => None,
                };
                Masking::Masks {
                    full: attention::attention_mask(batch, None, device)?.to_dtype(mask_dtype)?,
                    sliding,
                }
            }
        };
        Ok(Self {
            rows: batch.rows,
            seq_len: batch.seq_len,
            cos,
            sin,
            masking,
            pool,
        })
    }
}

/// Each row's real span (start, end) flattened, or None when a row's real tokens are not
/// one span (then the CPU runs the composed ops; a GPU refuses).
fn row_spans(batch: &PaddedBatch, gpu: bool) -> Result<Option<Vec<u32>>> {
    let s = batch.seq_len;
    let mut spans = Vec::with_capacity(2 * batch.rows);
    for row in batch.attention_mask.chunks(s) {
        let start = row.iter().position(|&m| m != 0).unwrap_or(s);
        let end = row.iter().rposition(|&m| m != 0).map_or(start, |e| e + 1);
        if row[start..end].contains(&0) {
            if !gpu {
                return Ok(None);
            }
            return Err(ModelError::Input(
                "the GPU attention needs each row's real tokens in one span (left or right padding)"
                    .into(),
            ));
        }
        spans.extend([start as u32, end as u32]);
    }
    Ok(Some(spans))
}
