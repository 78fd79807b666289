//! The DataFusion operators of arenaflow: tokenize and teacher-forward, streaming record
//! batches through the candle models of [`arenaflow_models`].

pub mod error;
pub mod sql;
pub mod teacher;
pub mod tokenize;

pub use error::{OperatorError, Result};
