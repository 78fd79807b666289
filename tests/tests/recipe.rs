//! The recipe's stages after teacher inference, through their plans on the CPU (the tiny
//! teacher of tests/fixtures/teacher, f32, 3 folds of 30 real rows): calibration fits on
//! the other folds' held-out logits and applies to the fold's own; bad logits and a
//! missing fold fail naming them and leave nothing that looks complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch};
use datafusion::arrow::datatypes::{Float32Type, Int8Type};

use arenaflow_tests::{
    arenaflow, parquet_batches, parquet_files, small_train, text, write_parquet,
};
use arenaflow_udfs::calibrate::{apply, fit, Method};

const MODEL: &str = "tests/fixtures/teacher/model";
const TOKENIZER: &str = "tests/fixtures/teacher/tokenizer.json";
const K: usize = 3;

fn run(plan: &str, run_dir: &Path, sets: &[String]) -> std::process::Output {
    let mut args: Vec<String> = vec!["run".into(), plan.into(), "--run-dir".into()];
    args.push(run_dir.display().to_string());
    for set in sets {
        args.push("--set".into());
        args.push(set.clone());
    }
    arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn run_ok(plan: &str, run_dir: &Path, sets: &[String]) -> String {
    let out = run(plan, run_dir, sets);
    let log = text(&out);
    assert!(out.status.success(), "{plan}: {log}");
    log
}

/// 30 real rows in 3 folds, and teacher `alpha`'s logits for every fold.
fn teacher_logits_of_every_fold() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let train = small_train(tmp.path(), 30);
    let k = format!("k={K}");
    run_ok(
        "plans/prepare.sql",
        &run_dir,
        &[format!("train={}", train.display())],
    );
    run_ok("plans/folds.sql", &run_dir, std::slice::from_ref(&k));
    for fold in 0..K {
        run_ok(
            "plans/teacher_logits.sql",
            &run_dir,
            &[
                format!("folds={}/folds/k{K}_seed2025_swaptrue/", run_dir.display()),
                format!("fold={fold}"),
                format!("model={MODEL}"),
                format!("tokenizer={TOKENIZER}"),
                "model_name=alpha".into(),
                "max_length=64".into(),
                "dtype=f32".into(),
            ],
        );
    }
    (tmp, run_dir)
}

/// (id, order, split) -> (label, logits) of every row under a logits folder.
type Logits = HashMap<(String, String, String), (usize, [f64; 3])>;

fn read_fold(folder: &Path) -> Logits {
    let mut out = HashMap::new();
    for file in parquet_files(folder) {
        let path = file.display().to_string();
        let split = if path.contains("split=valid") {
            "valid"
        } else if path.contains("split=train") {
            "train"
        } else {
            panic!("{path} is in no split= folder")
        };
        for batch in parquet_batches(&file) {
            let ids = batch.column_by_name("id").unwrap();
            let ids = datafusion::arrow::compute::cast(
                ids,
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let ids = ids.as_string::<i32>();
            let orders = batch.column_by_name("order").unwrap();
            let orders = datafusion::arrow::compute::cast(
                orders,
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let orders = orders.as_string::<i32>();
            let labels = batch
                .column_by_name("label")
                .unwrap()
                .as_primitive::<Int8Type>();
            let logits = batch.column_by_name("logits").unwrap().as_fixed_size_list();
            for r in 0..batch.num_rows() {
                let z = logits.value(r);
                let z = z.as_primitive::<Float32Type>();
                out.insert(
                    (
                        ids.value(r).to_string(),
                        orders.value(r).to_string(),
                        split.to_string(),
                    ),
                    (
                        labels.value(r) as usize,
                        [z.value(0) as f64, z.value(1) as f64, z.value(2) as f64],
                    ),
                );
            }
        }
    }
    out
}

fn calibrate(run_dir: &Path, fold: usize, method: &str) -> std::process::Output {
    run(
        "plans/calibrate.sql",
        run_dir,
        &[
            format!("folds={}/folds/k{K}_seed2025_swaptrue/", run_dir.display()),
            "teacher=alpha".into(),
            format!("k={K}"),
            format!("fold={fold}"),
            format!("method={method}"),
        ],
    )
}

#[test]
fn calibration_fits_on_the_other_folds_and_applies_to_the_folds_own_logits() {
    let (_tmp, run_dir) = teacher_logits_of_every_fold();
    make_the_teacher_informative(&run_dir);
    for method in ["temperature", "vector"] {
        let out = calibrate(&run_dir, 0, method);
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(
            log.contains("raw_log_loss") && log.contains("calibrated_log_loss"),
            "{log}"
        );

        // The fit, recomputed here from folds 1 and 2's held-out logits only.
        let mut rows = Vec::new();
        for other in 1..K {
            let logits = read_fold(&run_dir.join(format!("teacher/alpha/fold{other}")));
            rows.extend(
                logits
                    .iter()
                    .filter(|((_, _, split), _)| split == "valid")
                    .map(|(_, &(label, z))| (label, z)),
            );
        }
        // Both orders of the held-out ids of folds 1 and 2 (about two thirds of 30 ids).
        assert!(
            rows.len() > 30 && rows.len() % 2 == 0,
            "{} rows",
            rows.len()
        );
        let method_enum = Method::parse(method).unwrap();
        let params = fit(method_enum, &rows).unwrap();
        if method == "temperature" {
            assert!(params[0] > 1.0, "T = {}", params[0]);
        }

        let raw = read_fold(&run_dir.join("teacher/alpha/fold0"));
        let calibrated = read_fold(&run_dir.join(format!("teacher/alpha_{method}/fold0")));
        assert_eq!(raw.len(), calibrated.len());
        assert!(
            raw.keys().any(|(_, _, s)| s == "train") && raw.keys().any(|(_, _, s)| s == "valid")
        );
        for (key, (label, z)) in &raw {
            let (got_label, got) = calibrated
                .get(key)
                .unwrap_or_else(|| panic!("{key:?} missing"));
            assert_eq!(label, got_label);
            let want = apply(&params, *z).unwrap();
            for c in 0..3 {
                assert!(
                    (got[c] - want[c]).abs() <= 1e-5 * want[c].abs().max(1.0),
                    "{method} {key:?}: {got:?} vs {want:?}"
                );
            }
        }
    }
}

/// The calibrated logits are a teacher like any other: distill.sql takes them.
#[test]
fn distillation_takes_calibrated_logits() {
    let (_tmp, run_dir) = teacher_logits_of_every_fold();
    make_the_teacher_informative(&run_dir);
    let out = calibrate(&run_dir, 0, "temperature");
    assert!(out.status.success(), "{}", text(&out));
    let log = run_ok(
        "plans/distill.sql",
        &run_dir,
        &[
            format!("folds={}/folds/k{K}_seed2025_swaptrue/", run_dir.display()),
            format!("model={MODEL}"),
            format!("tokenizer={TOKENIZER}"),
            "teachers=alpha_temperature".into(),
            "max_length=64".into(),
            "dtype=f32".into(),
            "batch_rows=6".into(),
            "max_steps=2".into(),
            "lora_r=4".into(),
        ],
    );
    assert!(log.contains("1 teacher(s)"), "{log}");
    let mut kl_terms = 0;
    for file in parquet_files(&run_dir.join("train/student/fold0")) {
        for batch in parquet_batches(&file) {
            if let Some(kl) = batch.column_by_name("kl_alpha_temperature") {
                let kl = kl.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                kl_terms += kl
                    .iter()
                    .flatten()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .count();
            }
        }
    }
    assert_eq!(kl_terms, 2, "{log}");
}

/// Rewrites one Parquet file of logits, each row's through `change(row, label, logits)`;
/// returns the first row's id.
fn rewrite_logits(file: &Path, mut change: impl FnMut(usize, usize, &mut [f32])) -> String {
    let batches = parquet_batches(file);
    let schema = batches[0].schema();
    let column = schema.index_of("logits").unwrap();
    let mut first_id = None;
    let mut rewritten = Vec::new();
    let mut row = 0;
    for batch in &batches {
        let logits = batch.column(column).as_fixed_size_list();
        let labels = batch
            .column_by_name("label")
            .unwrap()
            .as_primitive::<Int8Type>();
        let mut values: Vec<f32> = logits
            .values()
            .as_primitive::<Float32Type>()
            .values()
            .to_vec();
        for r in 0..batch.num_rows() {
            change(row, labels.value(r) as usize, &mut values[3 * r..3 * r + 3]);
            row += 1;
        }
        if first_id.is_none() {
            let ids = datafusion::arrow::compute::cast(
                batch.column_by_name("id").unwrap(),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            first_id = Some(ids.as_string::<i32>().value(0).to_string());
        }
        let datafusion::arrow::datatypes::DataType::FixedSizeList(field, 3) =
            logits.data_type().clone()
        else {
            panic!("logits are not 3 x f32")
        };
        let changed = FixedSizeListArray::try_new(
            field,
            3,
            Arc::new(Float32Array::from(values)),
            logits.nulls().cloned(),
        )
        .unwrap();
        let mut columns = batch.columns().to_vec();
        columns[column] = Arc::new(changed);
        rewritten.push(RecordBatch::try_new(schema.clone(), columns).unwrap());
    }
    write_parquet(file, &rewritten);
    first_id.unwrap()
}

/// The tiny random teacher knows nothing: its logits are pushed toward the label, every
/// 4th row toward another class, so that they are informative and over-confident, as a
/// trained teacher's are (the temperature fit is then positive and above 1).
fn make_the_teacher_informative(run_dir: &Path) {
    for file in parquet_files(&run_dir.join("teacher/alpha")) {
        rewrite_logits(&file, |row, label, z| {
            let class = if row % 4 == 3 { (label + 1) % 3 } else { label };
            z[class] += 4.0;
        });
    }
}

#[test]
fn calibration_refuses_logits_that_are_not_finite_and_a_missing_fold() {
    let (_tmp, run_dir) = teacher_logits_of_every_fold();
    let valid: Vec<PathBuf> = parquet_files(&run_dir.join("teacher/alpha/fold1"))
        .into_iter()
        .filter(|f| f.display().to_string().contains("split=valid"))
        .collect();
    let id = rewrite_logits(&valid[0], |row, _, z| {
        if row == 0 {
            z[0] = f32::NAN
        }
    });
    let out = calibrate(&run_dir, 0, "temperature");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("the logits of id {id} ")) && said.contains("are not finite"),
        "{said}"
    );
    assert!(!run_dir.join("teacher/alpha_temperature/fold0").exists());

    // Infinity too.
    rewrite_logits(&valid[0], |row, _, z| {
        if row == 0 {
            z[0] = f32::INFINITY
        }
    });
    let said = text(&calibrate(&run_dir, 0, "temperature"));
    assert!(said.contains("are not finite"), "{said}");

    // Fold 1 loses its held-out rows' logits (a shard that never ran): named, not skipped.
    for file in &valid {
        std::fs::remove_file(file).unwrap();
    }
    let said = text(&calibrate(&run_dir, 0, "temperature"));
    assert!(
        said.contains("calibrate: teacher alpha has no logits for id ")
            && said.contains("valid side of fold 1)"),
        "{said}"
    );

    // Fold 2's logits are gone: the fit over "the other folds" would silently shrink.
    std::fs::remove_dir_all(run_dir.join("teacher/alpha/fold2")).unwrap();
    let out = calibrate(&run_dir, 0, "vector");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cannot read fold 2's logits"), "{said}");
    assert!(!run_dir.join("teacher/alpha_vector/fold0").exists());
}

/// Logits that rank the classes worse than chance on the held-out rows (a swapped label
/// mapping, say) get no temperature: the best 1/T would be negative.
#[test]
fn a_teacher_worse_than_chance_gets_no_temperature() {
    let (_tmp, run_dir) = teacher_logits_of_every_fold();
    for file in parquet_files(&run_dir.join("teacher/alpha")) {
        rewrite_logits(&file, |_, label, z| z[label] -= 4.0);
    }
    let out = calibrate(&run_dir, 1, "temperature");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("the best 1/T is not positive"), "{said}");
    assert!(!run_dir.join("teacher/alpha_temperature/fold1").exists());
}

fn predict(run_dir: &Path, comparisons: &str) -> std::process::Output {
    run(
        "plans/predict.sql",
        run_dir,
        &[
            format!("comparisons={comparisons}"),
            format!("model={MODEL}"),
            format!("tokenizer={TOKENIZER}"),
            "max_length=512".into(),
            "dtype=f32".into(),
        ],
    )
}

/// Kaggle's test.csv through predict.sql: a submission with Kaggle's header, one row per
/// id in the input's order, each row's probabilities summing to 1.
#[test]
fn predict_writes_a_kaggle_submission_in_the_inputs_order() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let test_csv = arenaflow_tests::shared("data/lmsys-arena/test.csv");
    let out = predict(&run_dir, &test_csv.display().to_string());
    assert!(out.status.success(), "{}", text(&out));
    let submission =
        std::fs::read_to_string(run_dir.join("predict/student/submission.csv")).unwrap();
    let mut lines = submission.lines();
    assert_eq!(
        lines.next(),
        Some("id,winner_model_a,winner_model_b,winner_tie")
    );
    let mut reader = csv::Reader::from_path(&test_csv).unwrap();
    let ids: Vec<String> = reader
        .records()
        .map(|r| r.unwrap().get(0).unwrap().to_string())
        .collect();
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
        ids,
        "{submission}"
    );
    for row in &rows {
        let p: Vec<f64> = row[1..].iter().map(|v| v.parse().unwrap()).collect();
        assert!(p.iter().all(|v| *v > 0.0 && *v < 1.0), "{row:?}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{row:?}");
    }
}

#[test]
fn predict_refuses_duplicate_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let test_csv = arenaflow_tests::shared("data/lmsys-arena/test.csv");
    let text_of = std::fs::read_to_string(&test_csv).unwrap();
    let mut lines: Vec<&str> = text_of.lines().collect();
    let second = lines[1];
    lines.push(second);
    let doubled = tmp.path().join("test.csv");
    std::fs::write(&doubled, lines.join("\n") + "\n").unwrap();
    let out = predict(&run_dir, &doubled.display().to_string());
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let id = second.split(',').next().unwrap();
    assert!(
        said.contains(&format!(
            "row 4 (id {id}), column id: duplicate id: row 1 has it too"
        )),
        "{said}"
    );
    assert!(!run_dir.join("predict/student/submission.csv").exists());
}

/// cv.sql scores fold 0's held-out side through predict's path with the fold's adapter:
/// one prediction per held-out id, probabilities summing to 1, the label carried.
#[test]
fn cv_scores_every_held_out_id_through_the_prediction_path() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let train = small_train(tmp.path(), 30);
    run_ok(
        "plans/prepare.sql",
        &run_dir,
        &[format!("train={}", train.display())],
    );
    run_ok("plans/folds.sql", &run_dir, &[format!("k={K}")]);
    let folds = format!("folds={}/folds/k{K}_seed2025_swaptrue/", run_dir.display());
    let common = [
        folds.clone(),
        format!("model={MODEL}"),
        format!("tokenizer={TOKENIZER}"),
        "model_name=student".to_string(),
        "dtype=f32".to_string(),
    ];
    let mut logs = Vec::new();
    for fold in 0..K {
        let mut train_sets = common.to_vec();
        train_sets
            .extend(["max_length=64", "batch_rows=6", "max_steps=2", "lora_r=4"].map(String::from));
        train_sets.push(format!("fold={fold}"));
        run_ok("plans/train_teacher.sql", &run_dir, &train_sets);
        let mut cv_sets = common.to_vec();
        cv_sets.extend(["max_length=256".to_string(), format!("fold={fold}")]);
        logs.push(run_ok("plans/cv.sql", &run_dir, &cv_sets));
    }
    let log = logs[0].clone();
    assert!(
        log.contains("tta_log_loss") && log.contains("ab_log_loss"),
        "{log}"
    );

    let mut ids = std::collections::HashSet::new();
    let mut nll = 0.0;
    for batch in parquet_batches(&run_dir.join("cv/student/predictions/fold0.parquet")) {
        let id = datafusion::arrow::compute::cast(
            batch.column_by_name("id").unwrap(),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let label = batch
            .column_by_name("label")
            .unwrap()
            .as_primitive::<Int8Type>();
        let p: Vec<_> = ["p_a", "p_b", "p_tie"]
            .map(|c| {
                batch
                    .column_by_name(c)
                    .unwrap()
                    .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
                    .clone()
            })
            .to_vec();
        for r in 0..batch.num_rows() {
            assert!(ids.insert(id.as_string::<i32>().value(r).to_string()));
            let sum = p[0].value(r) + p[1].value(r) + p[2].value(r);
            assert!((sum - 1.0).abs() < 1e-6);
            nll -= p[label.value(r) as usize].value(r).ln();
        }
    }
    // The held-out side of fold 0: about a third of 30 ids.
    assert!((5..=15).contains(&ids.len()), "{} ids", ids.len());
    let mean = nll / ids.len() as f64;
    assert!(
        log.contains(&format!("{mean:.6}")[..7]),
        "log loss {mean} not in\n{log}"
    );
}
