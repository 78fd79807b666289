//! plans/score.sql and plans/score_report.sql on the CPU with the tiny teacher of
//! tests/fixtures/teacher (f32) over 20 real rows: each variant's figures against the
//! scores it wrote (log loss and accuracy computed here from the definitions), the mean of
//! the fold models' probabilities, and the errors for a source without rows and for fold
//! models missing from the report.

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int8Type};

use arenaflow_tests::{arenaflow, parquet_batches, small_train, text};

const MODEL: &str = "tests/fixtures/teacher/model";
const TOKENIZER: &str = "tests/fixtures/teacher/tokenizer.json";

fn run(plan: &str, run_dir: &Path, sets: &[String]) -> std::process::Output {
    let mut args: Vec<String> = vec!["run".into(), plan.into(), "--run-dir".into()];
    args.push(run_dir.display().to_string());
    for set in sets {
        args.extend(["--set".into(), set.clone()]);
    }
    arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn score(run_dir: &Path, variant: &str, space: &str) -> std::process::Output {
    run(
        "plans/score.sql",
        run_dir,
        &[
            format!("model={MODEL}"),
            format!("tokenizer={TOKENIZER}"),
            "source=kaggle".into(),
            format!("variant={variant}"),
            format!("space={space}"),
            "max_length=96".into(),
            "dtype=f32".into(),
        ],
    )
}

/// id -> (label, TTA probabilities) of one variant's scores.
fn scores(path: &Path) -> BTreeMap<String, (usize, [f64; 3])> {
    let mut out = BTreeMap::new();
    for batch in parquet_batches(path) {
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let ids = col("id");
        let ids = ids.as_string_view_opt().map_or_else(
            || {
                (0..ids.len())
                    .map(|i| ids.as_string::<i32>().value(i).to_string())
                    .collect::<Vec<_>>()
            },
            |v| (0..v.len()).map(|i| v.value(i).to_string()).collect(),
        );
        let label = col("label");
        let label = label.as_primitive::<Int8Type>();
        let p: Vec<_> = ["p_a", "p_b", "p_tie"]
            .iter()
            .map(|n| col(n).as_primitive::<Float64Type>().clone())
            .collect();
        for (i, id) in ids.into_iter().enumerate() {
            out.insert(
                id,
                (
                    label.value(i) as usize,
                    [p[0].value(i), p[1].value(i), p[2].value(i)],
                ),
            );
        }
    }
    out
}

/// (log loss, accuracy) from the definitions.
fn figures(rows: &[(usize, [f64; 3])]) -> (f64, f64) {
    let n = rows.len() as f64;
    let loss = rows.iter().map(|(l, p)| -p[*l].ln()).sum::<f64>() / n;
    let hits = rows
        .iter()
        .filter(|(l, p)| (0..3).fold(0, |b, c| if p[c] > p[b] { c } else { b }) == *l)
        .count();
    (loss, hits as f64 / n)
}

#[test]
fn variants_and_the_fold_mean_match_the_definitions() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let train = small_train(tmp.path(), 20);
    let out = run(
        "plans/prepare.sql",
        &run_dir,
        &[format!("train={}", train.display())],
    );
    assert!(out.status.success(), "{}", text(&out));

    // Two "fold models" that differ (TTA in probability and in logit space) and one other.
    for (variant, space) in [
        ("fold0", "probability"),
        ("fold1", "logit"),
        ("merged", "probability"),
    ] {
        let out = score(&run_dir, variant, space);
        assert!(out.status.success(), "{}", text(&out));
    }
    let dir = run_dir.join("scores/student/kaggle");
    let fold0 = scores(&dir.join("fold0.parquet"));
    let fold1 = scores(&dir.join("fold1.parquet"));
    assert_eq!(fold0.len(), 20);
    assert!(
        fold0.iter().any(|(id, (_, p))| fold1[id].1 != *p),
        "the two fold models must differ for their mean to be checked"
    );
    let mean: Vec<(usize, [f64; 3])> = fold0
        .iter()
        .map(|(id, (l, p))| {
            let q = fold1[id].1;
            (
                *l,
                [
                    (p[0] + q[0]) / 2.0,
                    (p[1] + q[1]) / 2.0,
                    (p[2] + q[2]) / 2.0,
                ],
            )
        })
        .collect();

    // k = 3 fold models expected, 2 scored: an error naming the count, no report.
    let out = run(
        "plans/score_report.sql",
        &run_dir,
        &["k=3".into(), "source=kaggle".into()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("2 fold models scored"),
        "{}",
        text(&out)
    );
    assert!(!run_dir.join("report/student/kaggle.csv").exists());

    let out = run(
        "plans/score_report.sql",
        &run_dir,
        &["k=2".into(), "source=kaggle".into()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let csv = std::fs::read_to_string(run_dir.join("report/student/kaggle.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "variant,rows,ab_log_loss,ab_accuracy,tta_log_loss,tta_accuracy,tta_vs_fold_mean,tta_vs_fold_mean_se"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows.iter().map(|r| r[0]).collect::<Vec<_>>(),
        ["fold0", "fold1", "fold mean", "merged"]
    );
    let values = |name: &str| -> Vec<(usize, [f64; 3])> {
        scores(&dir.join(format!("{name}.parquet")))
            .into_values()
            .collect()
    };
    // Paired by row against the fold mean: the mean of the per-row differences of TTA log
    // loss and its standard error (sample standard deviation / sqrt(n)).
    let paired = |name: &str| -> (f64, f64) {
        let rows = scores(&dir.join(format!("{name}.parquet")));
        let diffs: Vec<f64> = rows
            .values()
            .zip(&mean)
            .map(|((l, p), (_, q))| -p[*l].ln() + q[*l].ln())
            .collect();
        let n = diffs.len() as f64;
        let avg = diffs.iter().sum::<f64>() / n;
        let var = diffs.iter().map(|d| (d - avg).powi(2)).sum::<f64>() / (n - 1.0);
        (avg, (var / n).sqrt())
    };
    for (row, want) in rows.iter().zip([
        paired("fold0"),
        paired("fold1"),
        (0.0, 0.0),
        paired("merged"),
    ]) {
        let (diff, se) = (
            row[6].parse::<f64>().unwrap(),
            row[7].parse::<f64>().unwrap(),
        );
        assert!(
            (diff - want.0).abs() < 1e-9,
            "{}: {diff} vs {}",
            row[0],
            want.0
        );
        assert!((se - want.1).abs() < 1e-9, "{}: {se} vs {}", row[0], want.1);
    }
    assert!(
        paired("merged").0 != 0.0,
        "the fixture should tell merged from the fold mean"
    );
    for (row, want) in rows.iter().zip([
        figures(&values("fold0")),
        figures(&values("fold1")),
        figures(&mean),
        figures(&values("merged")),
    ]) {
        assert_eq!(row[1], "20");
        let (loss, accuracy) = (
            row[4].parse::<f64>().unwrap(),
            row[5].parse::<f64>().unwrap(),
        );
        assert!(
            (loss - want.0).abs() < 1e-9,
            "{}: {loss} vs {}",
            row[0],
            want.0
        );
        assert!((accuracy - want.1).abs() < 1e-12, "{}", row[0]);
    }

    // A source with no rows.
    let out = run(
        "plans/score.sql",
        &run_dir,
        &[
            format!("model={MODEL}"),
            format!("tokenizer={TOKENIZER}"),
            "source=pandalm".into(),
            "dtype=f32".into(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no labelled rows of source pandalm"),
        "{}",
        text(&out)
    );
}
