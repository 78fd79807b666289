//! Errors of the engine library.

use datafusion::error::DataFusionError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A problem with a plan file, pointing at its line.
    #[error("{file}:{line}: {message}")]
    Plan {
        file: String,
        line: usize,
        message: String,
    },
    /// A statement of a plan failed; the message includes the statement's error.
    #[error("{file}:{line}: {error}")]
    Statement {
        file: String,
        line: usize,
        error: Box<EngineError>,
    },
    /// A bad location, input or statement; the message names it.
    #[error("{0}")]
    Invalid(String),
    #[error("run directory {run_dir}: {message}")]
    Manifest { run_dir: String, message: String },
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Model(#[from] arenaflow_models::error::ModelError),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A bad input row or file: names the file, the row (record number and id) and the column.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}{}: {message}", row_part(.record, .id), column_part(.column))]
pub struct SourceError {
    pub file: String,
    /// 1-based data record number (the header is not counted).
    pub record: Option<usize>,
    pub id: Option<String>,
    pub column: Option<String>,
    pub message: String,
}

fn row_part(record: &Option<usize>, id: &Option<String>) -> String {
    match (record, id) {
        (Some(r), Some(id)) => format!(": row {r} (id {id})"),
        (Some(r), None) => format!(": row {r}"),
        (None, Some(id)) => format!(": row with id {id}"),
        (None, None) => String::new(),
    }
}

fn column_part(column: &Option<String>) -> String {
    column
        .as_ref()
        .map(|c| format!(", column {c}"))
        .unwrap_or_default()
}

impl SourceError {
    pub fn file(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            record: None,
            id: None,
            column: None,
            message: message.into(),
        }
    }
    pub fn row(
        file: &str,
        record: usize,
        id: Option<&str>,
        column: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.to_string(),
            record: Some(record),
            id: id.map(str::to_string),
            column: column.map(str::to_string),
            message: message.into(),
        }
    }
}

impl From<SourceError> for DataFusionError {
    fn from(e: SourceError) -> Self {
        DataFusionError::Execution(e.to_string())
    }
}
