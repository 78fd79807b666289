//! The README's main job, `recipes/smollm2-cpu.toml`, end to end on the tiny fixtures (the
//! random teacher of tests/fixtures/teacher as teacher and student, 30 real rows per
//! source, 3 folds, 2 steps per training): every stage runs from the one recipe; a second
//! run finds everything up to date; a run killed with SIGKILL midway and run again ends
//! with the same files as the uninterrupted one; `describe` lists every knob; and bad
//! input to the last stages fails naming it, with nothing recorded complete.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int8Array, RecordBatch};
use serde_json::Value;

use arenaflow_tests::{
    arenaflow, arenaflow_bin, parquet_batches, parquet_files, repo_root, small_train, text,
    write_parquet,
};

const RECIPE: &str = "recipes/smollm2-cpu.toml";

/// The recipe's knobs for the fixtures.
fn fixture_sets(dir: &Path) -> Vec<String> {
    let train = small_train(dir, 30);
    let mut sets = vec![
        "model=tests/fixtures/teacher/model".to_string(),
        "tokenizer=tests/fixtures/teacher/tokenizer.json".to_string(),
        format!("train={}", train.display()),
    ];
    sets.extend(
        [
            "max_rows=30",
            "train_max_length=64",
            "infer_max_length=96",
            "prompt_cap=16",
            "post_pretrain_steps=2",
            "teacher_steps=2",
            "student_steps=2",
            "batch_rows=6",
            "lora_r=4",
            "lora_alpha=8",
        ]
        .map(String::from),
    );
    sets
}

fn args(plan: &str, run_dir: &Path, sets: &[String]) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        plan.to_string(),
        "--run-dir".to_string(),
        run_dir.display().to_string(),
    ];
    for set in sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    args
}

fn run(plan: &str, run_dir: &Path, sets: &[String]) -> std::process::Output {
    let args = args(plan, run_dir, sets);
    arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn manifest(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap()).unwrap()
}

/// Whether the manifest records any output under `prefix`.
fn recorded_under(run_dir: &Path, prefix: &str) -> bool {
    let m = manifest(run_dir);
    let outputs = m["outputs"].as_object().unwrap();
    outputs.keys().any(|k| k.starts_with(prefix))
}

fn complete(run_dir: &Path, key: &str) -> bool {
    manifest(run_dir)["outputs"][key]["status"] == "complete"
}

/// What the recipe hands to users: the submission, the report's figures and text, the
/// averaged adapter's weights.
const RESULTS: [&str; 4] = [
    "predict/student/submission.csv",
    "report/student/cv.csv",
    "report/student/report.md",
    "report/student/sources.csv",
];

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_main_job_runs_every_stage_from_the_recipe_and_resumes_after_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = fixture_sets(tmp.path());
    let whole = tmp.path().join("whole");

    let out = run(RECIPE, &whole, &sets);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for stage in [
        "plans/prepare.sql",
        "plans/post_pretrain.sql",
        "plans/train_teacher.sql (fold 2)",
        "plans/teacher_logits.sql (fold 2)",
        "plans/calibrate.sql (fold 2)",
        "plans/distill.sql (fold 2)",
        "plans/cv.sql (fold 2)",
        "plans/average.sql",
        "plans/predict.sql",
        "[21/21] plans/eval_report.sql",
    ] {
        assert!(log.contains(stage), "{stage} not in\n{log}");
    }
    // The CV table is printed; the report holds it and links the pictures.
    assert!(log.contains("calibrated_tta"), "{log}");
    let report = std::fs::read_to_string(whole.join("report/student/report.md")).unwrap();
    for part in [
        "## Log loss per fold",
        "| all |",
        "![reliability diagram](reliability.png)",
        "![loss curves](loss_curves.png)",
    ] {
        assert!(report.contains(part), "{part} not in\n{report}");
    }
    // The report's rows (compare.sql's input) are the rows its figures are of: each
    // variant's mean log loss over them is cv.csv's figure for all rows.
    rows_agree_with_the_figures(&whole.join("report/student"));
    for picture in ["reliability.png", "loss_curves.png"] {
        let png = std::fs::read(whole.join("report/student").join(picture)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{picture}");
        assert!(complete(&whole, &format!("report/student/{picture}")));
    }
    // The reliability diagram's points: at most 10 bins for each of the 3 classes.
    let points = manifest(&whole)["outputs"]["report/student/reliability.png"]["rows"]
        .as_u64()
        .unwrap();
    assert!((3..=30).contains(&points), "{points} points");
    // One submission row per test id, probabilities summing to 1.
    let submission = std::fs::read_to_string(whole.join("predict/student/submission.csv")).unwrap();
    let mut lines = submission.lines();
    assert_eq!(
        lines.next(),
        Some("id,winner_model_a,winner_model_b,winner_tie")
    );
    for line in lines {
        let p: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{line}");
    }
    // The averaged adapter: 3 folds, uniform weights.
    let weights = parquet_batches(&parquet_files(&whole.join("average/student_mean_uniform"))[0]);
    assert_eq!(weights.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
    assert!(whole
        .join("average/student_mean_uniform/adapter/adapter_model.safetensors")
        .exists());

    // Again: every output up to date, nothing written.
    let again = run(RECIPE, &whole, &sets);
    let log = text(&again);
    assert!(again.status.success(), "{log}");
    assert!(log.contains(", 0 outputs written,"), "{log}");

    // Killed (SIGKILL) once the student's training has begun, then run again.
    let killed = tmp.path().join("killed");
    let mut child = Command::new(arenaflow_bin())
        .args(args(RECIPE, &killed, &sets))
        .current_dir(repo_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let began = std::fs::read_to_string(killed.join("manifest.json"))
            .is_ok_and(|m| m.contains("teacher/teacher_vector/fold2"));
        if began || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            panic!("the recipe ended before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    let _ = child.kill();
    let _ = child.wait();
    assert!(!complete(&killed, "predict/student/submission.csv"));
    let resumed = run(RECIPE, &killed, &sets);
    assert!(resumed.status.success(), "{}", text(&resumed));
    for file in RESULTS {
        assert_eq!(
            std::fs::read(whole.join(file)).unwrap(),
            std::fs::read(killed.join(file)).unwrap(),
            "{file} differs after kill -9 and a rerun"
        );
    }

    bad_input_to_the_last_stages(&whole, tmp.path());
}

/// A label outside 0..2 in the teacher's logits, and fold adapters of different ranks:
/// each fails naming it, exits non-zero, and records nothing complete.
fn bad_input_to_the_last_stages(whole: &Path, tmp: &Path) {
    let bad = tmp.join("bad");
    copy_tree(whole, &bad);
    let folds = format!("folds={}/folds/k3_seed2025_swaptrue/", bad.display());

    // A held-out row of fold 1: what fold 0's calibration is fitted on.
    let logits = parquet_files(&bad.join("teacher/teacher/fold1"))
        .into_iter()
        .find(|f| f.display().to_string().contains("split=valid"))
        .unwrap();
    relabel_first_row(&logits, 7);
    let out = run(
        "plans/calibrate.sql",
        &bad,
        &[
            folds.clone(),
            "k=3".into(),
            "fold=0".into(),
            "method=temperature".into(),
        ],
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("held-out rows with a label outside 0 (A), 1 (B), 2 (tie): id "),
        "{log}"
    );
    assert!(!recorded_under(&bad, "teacher/teacher_temperature"));

    let config = bad.join("train/student/fold1/adapter/adapter_config.json");
    let text_before = std::fs::read_to_string(&config).unwrap();
    let mut parsed: Value = serde_json::from_str(&text_before).unwrap();
    parsed["r"] = Value::from(8);
    std::fs::write(&config, serde_json::to_string(&parsed).unwrap()).unwrap();
    let out = run(
        "plans/average.sql",
        &bad,
        &["k=3".into(), "weights=group_relative".into()],
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("fold0/adapter")
            && log.contains("fold1/adapter")
            && log.contains("different configs (r:"),
        "{log}"
    );
    assert!(!recorded_under(&bad, "average/student_mean_group_relative"));
    assert!(!bad.join("average/student_mean_group_relative").exists());
}

/// Rewrites a Parquet file of logits with the first row's label set to `label`.
fn relabel_first_row(file: &Path, label: i8) {
    let batches = parquet_batches(file);
    let schema = batches[0].schema();
    let column = schema.index_of("label").unwrap();
    let mut rewritten = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        let mut labels: Vec<Option<i8>> = batch
            .column(column)
            .as_any()
            .downcast_ref::<Int8Array>()
            .unwrap()
            .iter()
            .collect();
        if i == 0 {
            labels[0] = Some(label);
        }
        let mut columns = batch.columns().to_vec();
        columns[column] = Arc::new(Int8Array::from(labels));
        rewritten.push(RecordBatch::try_new(schema.clone(), columns).unwrap());
    }
    write_parquet(file, &rewritten);
}

#[test]
fn describe_lists_every_knob_of_the_recipe() {
    // The GPU recipes are checked as `run` checks them (every stage's values against its
    // plan): the profile and issue 14's three ablation parts.
    for (recipe, runs) in [
        ("recipes/smollm2-gpu.toml", 31),
        ("recipes/quality-teachers.toml", 30),
        ("recipes/quality-students.toml", 30),
        ("recipes/quality-ablation.toml", 40),
    ] {
        let gpu = arenaflow(&["describe", recipe]);
        assert!(gpu.status.success(), "{}", text(&gpu));
        assert!(
            text(&gpu).contains(&format!("{recipe} ({runs} plan runs)")),
            "{}",
            text(&gpu)
        );
    }
    let out = arenaflow(&["describe", RECIPE]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("recipes/smollm2-cpu.toml (21 plan runs)"),
        "{log}"
    );
    for line in [
        "teacher_steps",
        "11. plans/eval_report.sql (stage eval_report)",
        "4. plans/train_teacher.sql (stage train_teacher), once per fold 0..k-1",
    ] {
        assert!(log.contains(line), "{line} not in\n{log}");
    }
    // Every parameter of every stage's plan is listed with where its value comes from.
    let plan = declared_params("plans/distill.sql");
    for name in plan {
        assert!(
            log.contains(&format!("       {name} ")),
            "{name} not in\n{log}"
        );
    }
}

/// The parameter names a plan declares (`-- param NAME...`).
fn declared_params(path: &str) -> Vec<String> {
    std::fs::read_to_string(repo_root().join(path))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("-- param "))
        .map(|l| l.split([':', ' ', '=']).next().unwrap().to_string())
        .collect()
}

#[test]
fn stages_runs_only_the_stages_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let sets = fixture_sets(dir.path());
    let mut selected = args(RECIPE, &run_dir, &sets);
    selected.extend(["--stages".to_string(), "1-2".to_string()]);
    let out = arenaflow(&selected.iter().map(String::as_str).collect::<Vec<_>>());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("2 plan runs"), "{log}");
    assert!(recorded_under(&run_dir, "prepare/"), "{log}");
    assert!(recorded_under(&run_dir, "folds/"), "{log}");
    assert!(!recorded_under(&run_dir, "teacher/"), "{log}");
    let mut beyond = args(RECIPE, &run_dir, &sets);
    beyond.extend(["--stages".to_string(), "3-40".to_string()]);
    let out = arenaflow(&beyond.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    assert!(text(&out).contains("--stages 3-40"), "{}", text(&out));
}

#[test]
fn folds_runs_the_per_fold_stages_for_the_folds_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let sets = fixture_sets(dir.path());
    let run = |extra: &[&str]| {
        let mut selected = args(RECIPE, &run_dir, &sets);
        selected.extend(extra.iter().map(|s| s.to_string()));
        arenaflow(&selected.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Stages 1-3 run once; stage 4 (per fold) for fold 2 alone.
    let out = run(&["--stages", "1-4", "--folds", "2"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("4 plan runs"), "{log}");
    assert!(log.contains("train_teacher.sql (fold 2)"), "{log}");
    assert!(recorded_under(&run_dir, "train/teacher/fold2"), "{log}");
    assert!(!recorded_under(&run_dir, "train/teacher/fold0"), "{log}");
    assert!(!recorded_under(&run_dir, "train/teacher/fold1"), "{log}");
    let out = run(&["--folds", "3"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--folds 3") && text(&out).contains("folds 0-2"),
        "{}",
        text(&out)
    );
}

/// report/{model}/rows.parquet against cv.csv: per variant, the rows' mean log loss (clipped
/// at 1e-15, as the report's) equals the `all` figure over as many rows.
fn rows_agree_with_the_figures(report: &Path) {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Float64Type, Int8Type};
    let mut losses: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for batch in arenaflow_tests::parquet_batches(&report.join("rows.parquet")) {
        let column = |name: &str| batch.column_by_name(name).unwrap().clone();
        let variant = column("variant");
        let label = column("label");
        let (variant, label) = (variant.as_string::<i32>(), label.as_primitive::<Int8Type>());
        let p: Vec<_> = ["p_a", "p_b", "p_tie"].map(column).to_vec();
        for r in 0..batch.num_rows() {
            let p_label = p[label.value(r) as usize]
                .as_primitive::<Float64Type>()
                .value(r);
            losses
                .entry(variant.value(r).to_string())
                .or_default()
                .push(-p_label.clamp(1e-15, 1.0).ln());
        }
    }
    let figures = std::fs::read_to_string(report.join("cv.csv")).unwrap();
    let mut seen = 0;
    for line in figures.lines().filter(|l| l.starts_with("all,")) {
        let cells: Vec<&str> = line.split(',').collect();
        let rows = &losses[cells[1]];
        assert_eq!(rows.len().to_string(), cells[2], "{line}");
        let mean = rows.iter().sum::<f64>() / rows.len() as f64;
        let figure: f64 = cells[3].parse().unwrap();
        assert!((mean - figure).abs() < 1e-9, "{line}: rows give {mean}");
        seen += 1;
    }
    assert_eq!(seen, 6, "{figures}");
    assert_eq!(losses.len(), 6);
}
