//! The candle model stack of arenaflow: the three families of the recipe (Llama-3, Qwen2,
//! Gemma-2) as 3-class sequence classifiers ([`models`]) with LoRA ([`lora`]), loaded all or
//! nothing ([`weights`], [`checkpoint`], [`gguf`], [`hub`]). Data flows model ->
//! [`layers`] -> [`ops`] (one custom op per file, CPU and CUDA sides together) -> kernels
//! (`kernels/*.cu`, loaded by `cuda.rs`) and never back up. No DataFusion, Arrow or tokio:
//! the operators crate adapts these to record batches.

pub mod average;
pub mod checkpoint;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
pub mod error;
pub mod gguf;
pub mod gptq;
pub mod hub;
pub mod layers;
pub mod lora;
pub mod models;
pub mod ops;
pub mod profile;
pub mod quantize;
#[cfg(test)]
mod test_util;
pub mod train;
pub mod weights;

pub use error::{ModelError, Result};
