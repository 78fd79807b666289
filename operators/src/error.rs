//! The error type of the operators' own work (tokenizers, templates, token rows, batch
//! commits); model errors pass through unchanged. At the SQL boundary it becomes
//! `DataFusionError::External`.

use std::path::PathBuf;

use arenaflow_models::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Model(#[from] ModelError),

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("template {path}: {message}")]
    Template { path: PathBuf, message: String },

    /// A setting of an operator that cannot work.
    #[error("{0}")]
    Config(String),

    #[error("{0}")]
    Input(String),
}

/// File errors are the model crate's ([`ModelError::Io`], [`ModelError::File`]): one
/// wording for both crates.
impl OperatorError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Model(ModelError::io(path, source))
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Model(ModelError::file(path, message))
    }
}

impl From<candle_core::Error> for OperatorError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e.into())
    }
}

pub type Result<T, E = OperatorError> = std::result::Result<T, E>;
