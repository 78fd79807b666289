//! The SQL session every plan runs in: arenaflow's functions, readers and stores.

use std::sync::Arc;

use arenaflow_operators::teacher::ForwardEnv;
use arenaflow_operators::tokenize::exec::InputHook;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::Result;
use crate::inputs::InputTracker;
use crate::sources::register_sources;
use crate::storage::register_s3_buckets;

pub struct ArenaSession {
    pub ctx: SessionContext,
    pub inputs: InputTracker,
    /// Where `teacher_forward` commits, and the figures it reports back.
    pub forward: ForwardEnv,
}

impl Default for ArenaSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ArenaSession {
    pub fn new() -> Self {
        let config = SessionConfig::new().with_information_schema(true);
        let ctx = SessionContext::new_with_config(config);
        arenaflow_udfs::register_all(&ctx);
        let inputs = InputTracker::default();
        register_sources(&ctx, &inputs);
        let tracker = inputs.clone();
        let on_input: InputHook = Arc::new(move |path: &str| tracker.record(path));
        arenaflow_operators::tokenize::exec::register(&ctx, on_input.clone());
        let forward = ForwardEnv::default();
        arenaflow_operators::teacher::exec::register(&ctx, on_input, forward.clone());
        Self {
            ctx,
            inputs,
            forward,
        }
    }

    /// Registers S3 stores for the buckets a SQL text names.
    pub fn register_stores_for(&self, text: &str) -> Result<()> {
        register_s3_buckets(&self.ctx, text)
    }
}
