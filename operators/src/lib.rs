//! Model operators of arenaflow: tokenize, teacher-forward, distill-step, calibrate and
//! symmetrize, streaming record batches through candle models.
//!
//! The models ([`models`]) are the three families of the recipe as 3-class sequence
//! classifiers with LoRA ([`lora`]), loaded all or nothing ([`weights`], [`checkpoint`],
//! [`gguf`], [`hub`]).

pub mod attention;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod gguf;
pub mod hub;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod lora;
pub mod models;
pub mod profile;
pub mod sql;
pub mod teacher;
pub mod tokenize;
pub mod weights;

pub use error::{ModelError, Result};
