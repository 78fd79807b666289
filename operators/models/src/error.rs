//! The one error type of the model stack.

use std::path::PathBuf;

/// What went wrong while loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    /// Loading is all or nothing: every tensor the architecture names must be there, and
    /// nothing else may be.
    #[error("{source_name}: {}", describe_mismatch(missing, unexpected))]
    TensorMismatch {
        source_name: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },

    #[error("{0}")]
    Config(String),

    #[error("hub: {0}")]
    Hub(String),

    #[error("{0}")]
    Input(String),
}

fn describe_mismatch(missing: &[String], unexpected: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} missing tensor(s): {}",
            missing.len(),
            list_names(missing)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected tensor(s): {}",
            unexpected.len(),
            list_names(unexpected)
        ));
    }
    parts.join("; ")
}

fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 40;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(", ... and {} more", names.len() - SHOWN));
    }
    text
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Returns early with a [`ModelError::Config`] built from a format string.
#[macro_export]
macro_rules! config_bail {
    ($($arg:tt)*) => {
        return Err($crate::error::ModelError::Config(format!($($arg)*)))
    };
}
