//! The loss curve of a training run as a PNG (`loss.png` beside the adapter): the training
//! loss per step and the dev log loss per evaluation against the step, drawn with
//! plotters into a bitmap (text in DejaVu Sans, embedded) and encoded with `png`.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{OperatorError, Result};
use arenaflow_models::train::Event;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;

fn plot_error(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Config(format!("loss curve: {e}"))
}

/// Draws the events' training loss and dev log loss and writes the PNG to `path`.
pub fn write_loss_curve(events: &[Event], path: &Path) -> Result<()> {
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let train: Vec<(f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step(m) => Some((m.step as f64, m.terms.loss)),
            _ => None,
        })
        .collect();
    let dev: Vec<(f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Eval(m) => Some((m.step as f64, m.log_loss)),
            _ => None,
        })
        .collect();
    let last = train.last().map_or(1.0, |p| p.0).max(1.0);
    let values = train
        .iter()
        .chain(&dev)
        .map(|p| p.1)
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo, hi) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss and dev log loss", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..last, (lo - pad)..(hi + pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(plot_error)?
            .label("train loss (per step)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !dev.is_empty() {
            chart
                .draw_series(LineSeries::new(dev.iter().copied(), RED.stroke_width(2)))
                .map_err(plot_error)?
                .label("dev log loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart
                .draw_series(dev.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    let file = std::fs::File::create(path).map_err(|e| OperatorError::io(path, e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(plot_error)?;
    writer.write_image_data(&pixels).map_err(plot_error)?;
    writer.finish().map_err(plot_error)?;
    Ok(())
}
