//! arenaflow's engine: the SQL session, plan files and their runner, the run manifest,
//! storage, and the readers of preference data sets.

pub mod error;
pub mod lock;
pub mod logits;
pub mod manifest;
pub mod plan;
pub mod quantize;
pub mod recipe;
pub mod runner;
pub mod session;
pub mod sources;
pub mod storage;
pub mod train;
pub mod workers;

pub use error::{EngineError, Result, SourceError};
pub use plan::PlanFile;
pub use runner::{run_plan, RunOptions, RunSummary};
pub use session::ArenaSession;
