//! Pictures for reports, drawn with plotters into a bitmap (text in DejaVu Sans, embedded,
//! so that a machine without fonts draws the same) and encoded as PNG: a line chart of
//! named series (loss curves) and a reliability diagram (one curve per class, with the rows
//! in each bin).

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{OperatorError, Result};

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
/// The reliability diagram: the curves above, the bins' row counts below.
const RELIABILITY_HEIGHT: u32 = 760;

/// Series colours, in the order series first appear (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A series with at most this many points is drawn with a marker at each point.
const MARKED_POINTS: usize = 60;

fn chart_error(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Config(format!("chart: {e}"))
}

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Registers the embedded font as plotters' `sans-serif` (once per process).
fn register_font() {
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draws into a white RGB bitmap of `width` x `height` and encodes it as PNG.
fn draw_png(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    register_font();
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        draw(&root)?;
        root.present().map_err(chart_error)?;
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(chart_error)?;
    writer.write_image_data(&pixels).map_err(chart_error)?;
    writer.finish().map_err(chart_error)?;
    Ok(bytes)
}

/// One named curve: its points in drawing order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Series of one colour key share a colour (a fold's training and dev curves); None:
    /// a colour of its own.
    pub colour: Option<String>,
}

/// The range of `values` (finite ones) with 5% of room on each side.
fn padded_range(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi { fallback } else { (lo, hi) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Axis titles and the caption of a chart.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// A line chart of `series` (a legend names them; a series of few points is marked at
/// each), as PNG bytes.
pub fn line_chart(labels: Labels<'_>, series: &[Series]) -> Result<Vec<u8>> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x = padded_range(all().map(|p| p.0), (0.0, 1.0));
    let y = padded_range(all().map(|p| p.1), (0.0, 1.0));
    draw_png(WIDTH, HEIGHT, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(labels.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc(labels.x)
            .y_desc(labels.y)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(chart_error)?;
        let mut keys: Vec<String> = Vec::new();
        for (i, s) in series.iter().enumerate() {
            let key = s.colour.clone().unwrap_or_else(|| format!("series {i}"));
            let index = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                keys.push(key);
                keys.len() - 1
            });
            let c = colour(index);
            let marked = s.points.len() <= MARKED_POINTS;
            let stroke = if marked { 2 } else { 1 };
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    c.stroke_width(stroke),
                ))
                .map_err(chart_error)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            if marked {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(chart_error)?;
            }
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(chart_error)?;
        }
        Ok(())
    })
}

/// One bin of one class in a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReliabilityBin {
    /// 0-based, of `bins` equal-width bins of the predicted probability on [0, 1].
    pub bin: usize,
    /// Mean predicted probability of the class over the bin's rows.
    pub predicted: f64,
    /// Fraction of the bin's rows whose label is the class.
    pub observed: f64,
    pub rows: u64,
}

/// One class's curve.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReliabilityCurve {
    pub class: String,
    pub bins: Vec<ReliabilityBin>,
}

/// A reliability diagram as PNG bytes: above, each class's observed frequency against its
/// mean predicted probability per bin, with the diagonal of perfect calibration; below,
/// the rows in each bin, one bar per class.
pub fn reliability_diagram(
    title: &str,
    bins: usize,
    curves: &[ReliabilityCurve],
) -> Result<Vec<u8>> {
    let bins = bins.max(1);
    let most = curves
        .iter()
        .flat_map(|c| c.bins.iter().map(|b| b.rows))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    draw_png(WIDTH, RELIABILITY_HEIGHT, |root| {
        let root = root
            .titled(title, ("sans-serif", 22))
            .map_err(chart_error)?;
        let (upper, lower) = root.split_vertically(RELIABILITY_HEIGHT * 62 / 100);
        let mut chart = ChartBuilder::on(&upper)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("mean predicted probability")
            .y_desc("observed frequency")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))
            .map_err(chart_error)?
            .label("perfectly calibrated")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
        for (i, curve) in curves.iter().enumerate() {
            let c = colour(i);
            let points: Vec<(f64, f64)> = curve
                .bins
                .iter()
                .map(|b| (b.predicted, b.observed))
                .collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                .map_err(chart_error)?
                .label(curve.class.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(chart_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(chart_error)?;

        let mut counts = ChartBuilder::on(&lower)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..1.0, 0.0..most * 1.15)
            .map_err(chart_error)?;
        counts
            .configure_mesh()
            .x_desc("predicted probability bin")
            .y_desc("rows")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(chart_error)?;
        let width = 1.0 / bins as f64;
        let bar = width * 0.8 / curves.len().max(1) as f64;
        for (i, curve) in curves.iter().enumerate() {
            let c = colour(i);
            counts
                .draw_series(curve.bins.iter().map(|b| {
                    let left = b.bin as f64 * width + width * 0.1 + i as f64 * bar;
                    Rectangle::new([(left, 0.0), (left + bar, b.rows as f64)], c.filled())
                }))
                .map_err(chart_error)?;
            counts
                .draw_series(curve.bins.iter().filter(|b| b.rows > 0).map(|b| {
                    let centre = b.bin as f64 * width + width * 0.1 + (i as f64 + 0.5) * bar;
                    Text::new(
                        b.rows.to_string(),
                        (centre - bar * 0.4, b.rows as f64 + most * 0.08),
                        ("sans-serif", 10),
                    )
                }))
                .map_err(chart_error)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        (info.width, info.height, pixels)
    }

    fn has_colour(pixels: &[u8], c: RGBColor) -> bool {
        pixels.chunks(3).any(|p| p == [c.0, c.1, c.2])
    }

    #[test]
    fn a_line_chart_draws_each_series_in_its_colour() {
        let series = [
            Series {
                name: "train".into(),
                points: (0..200)
                    .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                    .collect(),
                colour: None,
            },
            Series {
                name: "dev".into(),
                points: vec![(0.0, 1.1), (100.0, 0.9), (199.0, 0.8)],
                colour: None,
            },
        ];
        let labels = Labels {
            title: "loss",
            x: "step",
            y: "loss",
        };
        let (w, h, pixels) = decoded(&line_chart(labels, &series).unwrap());
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(has_colour(&pixels, colour(0)) && has_colour(&pixels, colour(1)));
        assert!(!has_colour(&pixels, colour(2)));

        // One colour key: both curves in the first colour.
        let shared: Vec<Series> = series
            .iter()
            .cloned()
            .map(|s| Series {
                colour: Some("fold 0".into()),
                ..s
            })
            .collect();
        let (_, _, pixels) = decoded(&line_chart(labels, &shared).unwrap());
        assert!(has_colour(&pixels, colour(0)) && !has_colour(&pixels, colour(1)));
    }

    #[test]
    fn a_reliability_diagram_has_one_curve_per_class() {
        let curve = |class: &str, shift: f64| ReliabilityCurve {
            class: class.into(),
            bins: (0..10)
                .map(|b| ReliabilityBin {
                    bin: b,
                    predicted: b as f64 / 10.0 + 0.05,
                    observed: (b as f64 / 10.0 + shift).clamp(0.0, 1.0),
                    rows: 10 + b as u64,
                })
                .collect(),
        };
        let curves = [curve("A", 0.0), curve("B", 0.1), curve("tie", -0.1)];
        let (w, h, pixels) = decoded(&reliability_diagram("r", 10, &curves).unwrap());
        assert_eq!((w, h), (WIDTH, RELIABILITY_HEIGHT));
        for i in 0..3 {
            assert!(has_colour(&pixels, colour(i)), "class {i}");
        }
    }
}
