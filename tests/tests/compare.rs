//! plans/compare.sql: two models' held-out predictions (eval_report.sql's rows) paired row by row, against the
//! per-row log losses and their mean difference and standard error computed here from the
//! definitions; rows that are not the same on both sides and unknown variants are errors.

use std::path::Path;
use std::sync::Arc;

use arenaflow_tests::{arenaflow, text, write_parquet};
use datafusion::arrow::array::{Float64Array, Int64Array, Int8Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;

/// (fold, id, label, TTA probabilities, order-ab probabilities)
type Row = (i64, &'static str, i8, [f64; 3], [f64; 3]);

const UNIFORM: [f64; 3] = [1.0 / 3.0; 3];

/// eval_report.sql's rows layout (report/{model}/rows.parquet): each row under the variants
/// `ab` (the order-ab probabilities), `tta`, and `ab calibrated` (here the TTA ones again,
/// so that a variant's name is seen to pick its rows).
fn predictions(run: &Path, model: &str, rows: &[Row]) {
    let dir = run.join("report").join(model);
    std::fs::create_dir_all(&dir).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("fold", DataType::Int64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("variant", DataType::Utf8, false),
        Field::new("label", DataType::Int8, false),
        Field::new("p_a", DataType::Float64, false),
        Field::new("p_b", DataType::Float64, false),
        Field::new("p_tie", DataType::Float64, false),
    ]));
    let batches: Vec<RecordBatch> = [("ab", false), ("tta", true), ("ab calibrated", true)]
        .iter()
        .map(|&(variant, tta)| {
            let column = |i: usize| {
                Arc::new(Float64Array::from(
                    rows.iter()
                        .map(|r| if tta { r.3[i] } else { r.4[i] })
                        .collect::<Vec<_>>(),
                ))
            };
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(
                        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                    )),
                    Arc::new(StringArray::from(
                        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                    )),
                    Arc::new(StringArray::from(vec![variant; rows.len()])),
                    Arc::new(Int8Array::from(
                        rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                    )),
                    column(0),
                    column(1),
                    column(2),
                ],
            )
            .unwrap()
        })
        .collect();
    write_parquet(&dir.join("rows.parquet"), &batches);
}

fn model_x() -> Vec<Row> {
    vec![
        (0, "i1", 0, [0.5, 0.3, 0.2], UNIFORM),
        (0, "i2", 1, [0.2, 0.6, 0.2], UNIFORM),
        (1, "i3", 2, [0.3, 0.3, 0.4], UNIFORM),
        (1, "i4", 0, [0.25, 0.25, 0.5], UNIFORM),
    ]
}

fn model_y() -> Vec<Row> {
    vec![
        (0, "i1", 0, [0.6, 0.2, 0.2], [0.2, 0.4, 0.4]),
        (0, "i2", 1, [0.3, 0.5, 0.2], [0.2, 0.4, 0.4]),
        (1, "i3", 2, [0.2, 0.2, 0.6], [0.2, 0.4, 0.4]),
        (1, "i4", 0, [0.5, 0.25, 0.25], [0.2, 0.4, 0.4]),
    ]
}

fn losses(rows: &[Row], tta: bool) -> Vec<f64> {
    rows.iter()
        .map(|r| -(if tta { r.3 } else { r.4 })[r.2 as usize].ln())
        .collect()
}

/// Mean and standard error of the mean.
fn mean_se(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

fn compare(run: &Path, sets: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "plans/compare.sql",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    arenaflow(&args)
}

/// The CSV's rows: fold -> (rows, log_loss_a, log_loss_b, diff, diff_se, share_b_better).
fn figures(path: &Path) -> Vec<(String, Vec<f64>)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "fold,a,b,rows,log_loss_a,log_loss_b,diff,diff_se,share_b_better"
    );
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let numbers = [3, 4, 5, 6, 7, 8]
                .iter()
                .map(|&i| cells[i].parse::<f64>().unwrap())
                .collect();
            (cells[0].to_string(), numbers)
        })
        .collect()
}

fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

#[test]
fn paired_differences_match_the_definition() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    predictions(&run, "x", &model_x());
    predictions(&run, "y", &model_y());

    let out = compare(&run, &["model_a=x", "model_b=y"]);
    assert!(out.status.success(), "{}", text(&out));
    let (lx, ly) = (losses(&model_x(), true), losses(&model_y(), true));
    let diffs: Vec<f64> = ly.iter().zip(&lx).map(|(b, a)| b - a).collect();
    let rows = figures(&run.join("report/compare/y_tta_vs_x_tta.csv"));
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["0", "1", "all"]
    );
    for (part, range) in [("0", 0..2), ("1", 2..4), ("all", 0..4)] {
        let got = &rows.iter().find(|r| r.0 == part).unwrap().1;
        let d = &diffs[range.clone()];
        let (mean, se) = mean_se(d);
        close(got[0], d.len() as f64);
        close(
            got[1],
            lx[range.clone()].iter().sum::<f64>() / d.len() as f64,
        );
        close(
            got[2],
            ly[range.clone()].iter().sum::<f64>() / d.len() as f64,
        );
        close(got[3], mean);
        close(got[4], se);
        close(
            got[5],
            d.iter().filter(|&&v| v < 0.0).count() as f64 / d.len() as f64,
        );
    }
    // By hand: the differences are ln(5/6), ln(6/5), ln(2/3), ln(1/2), whose mean is -ln(3)/4.
    close(rows[2].1[3], -(3f64.ln()) / 4.0);

    // One model's first order against its TTA: the ab side here is uniform.
    let out = compare(
        &run,
        &["model_a=y", "variant_a=ab", "model_b=x", "variant_b=tta"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let rows = figures(&run.join("report/compare/x_tta_vs_y_ab.csv"));
    let la = losses(&model_y(), false);
    close(rows[2].1[1], la.iter().sum::<f64>() / 4.0);
    close(rows[2].1[2], lx.iter().sum::<f64>() / 4.0);

    // A variant's name picks its rows: x's `ab calibrated` rows are its TTA ones here.
    let out = compare(
        &run,
        &[
            "model_a=x",
            "variant_a=tta",
            "model_b=x",
            "variant_b=ab_calibrated",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let rows = figures(&run.join("report/compare/x_ab_calibrated_vs_x_tta.csv"));
    close(rows[2].1[3], 0.0);
    close(rows[2].1[2], lx.iter().sum::<f64>() / 4.0);
}

#[test]
fn rows_that_differ_and_unknown_variants_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    predictions(&run, "x", &model_x());
    let mut fewer = model_y();
    fewer.pop();
    predictions(&run, "y", &fewer);
    let out = compare(&run, &["model_a=x", "model_b=y"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("did not score the same ids (0 only in y, 1 only in x)"),
        "{}",
        text(&out)
    );
    assert!(!run.join("report/compare/y_tta_vs_x_tta.csv").exists());

    let out = compare(&run, &["model_a=x", "model_b=x", "variant_b=calibrated"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("variant_a and variant_b must be one of ab, ba"),
        "{}",
        text(&out)
    );
}
