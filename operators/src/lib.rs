//! Model operators of arenaflow: tokenize, teacher-forward, distill-step, calibrate and
//! symmetrize, streaming record batches through candle models.
//!
//! Empty until the "Models" issue lands; the crate exists so the workspace has the layout
//! of DESIGN.md from the start.
