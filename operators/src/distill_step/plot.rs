//! The loss curve of a training run as a PNG (`loss.png` beside the adapter): the training
//! loss per step and the dev log loss per evaluation against the step.

use std::path::Path;

use crate::charts::{line_chart, Labels, Series};
use crate::error::{OperatorError, Result};
use arenaflow_models::train::Event;

/// Draws the events' training loss and dev log loss and writes the PNG to `path`.
pub fn write_loss_curve(events: &[Event], path: &Path) -> Result<()> {
    let mut train = Series {
        name: "train loss (per step)".into(),
        points: Vec::new(),
        colour: None,
    };
    let mut dev = Series {
        name: "dev log loss".into(),
        points: Vec::new(),
        colour: None,
    };
    for event in events {
        match event {
            Event::Step(m) => train.points.push((m.step as f64, m.terms.loss)),
            Event::Eval(m) => dev.points.push((m.step as f64, m.log_loss)),
        }
    }
    let series: Vec<Series> = [train, dev]
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    let labels = Labels {
        title: "training loss and dev log loss",
        x: "optimizer step",
        y: "loss",
    };
    let png = line_chart(labels, &series)?;
    std::fs::write(path, png).map_err(|e| OperatorError::io(path, e))
}
