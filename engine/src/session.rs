//! The SQL session every plan runs in: arenaflow's functions, readers and stores.

use std::sync::Arc;

use arenaflow_operators::distill_step::exec::training_figures;
use arenaflow_operators::distill_step::TrainingStats;
use arenaflow_operators::run_state::RunInputs;
use arenaflow_operators::teacher_forward::exec::pass_figures;
use arenaflow_operators::teacher_forward::ForwardStats;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::dataframe::DataFrame;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::Result;
use crate::sources::register_sources;
use crate::storage::register_s3_buckets;

pub struct ArenaSession {
    pub ctx: SessionContext,
    /// The files the run's table functions read (a session extension they record into).
    pub inputs: RunInputs,
}

impl Default for ArenaSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ArenaSession {
    pub fn new() -> Self {
        Self::with_config(SessionConfig::new())
    }

    /// A session on `config` (with the information schema on and the run's extensions).
    pub fn with_config(config: SessionConfig) -> Self {
        let inputs = RunInputs::default();
        let config = config
            .with_information_schema(true)
            .with_extension(Arc::new(inputs.clone()));
        let ctx = SessionContext::new_with_config(config);
        arenaflow_udfs::register_all(&ctx);
        register_sources(&ctx);
        arenaflow_operators::register(&ctx);
        Self { ctx, inputs }
    }

    /// Registers S3 stores for the buckets a SQL text names.
    pub fn register_stores_for(&self, text: &str) -> Result<()> {
        register_s3_buckets(&self.ctx, text)
    }
}

/// What running a plan gives: its batches and the figures of every model pass in it (read
/// from the operators' plan metrics).
pub struct Executed {
    pub batches: Vec<RecordBatch>,
    pub passes: Vec<ForwardStats>,
    pub trainings: Vec<TrainingStats>,
}

/// Runs `plan` in `state` (a statement's session state, with its extensions).
pub async fn execute(state: SessionState, plan: LogicalPlan) -> Result<Executed> {
    let frame = DataFrame::new(state, plan);
    let task = Arc::new(frame.task_ctx());
    let physical = frame.create_physical_plan().await?;
    let batches = datafusion::physical_plan::collect(physical.clone(), task).await?;
    Ok(Executed {
        batches,
        passes: pass_figures(&physical),
        trainings: training_figures(&physical),
    })
}
