//! Model operators of arenaflow: tokenize, teacher-forward, distill-step, calibrate and
//! symmetrize, streaming record batches through candle models.
