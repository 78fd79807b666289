//! The teacher-forward operator and plans on the CPU: coverage, resume after kill -9,
//! shards and their merge, the same logits as single-row forwards, and bad input. The
//! teacher is tests/fixtures/teacher: a byte-level tokenizer and a tiny random Llama.

use std::collections::HashMap;
use std::path::Path;

use arenaflow_tests::{
    arenaflow, arenaflow_with_env, kill_at_pause, parquet_batches, parquet_files, read_logits,
    repo_root, small_train, text, write_parquet,
};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Float32Type;

const MODEL: &str = "tests/fixtures/teacher/model";
const TOKENIZER: &str = "tests/fixtures/teacher/tokenizer.json";

/// (id, order, split) -> logits.
type Logits = HashMap<(String, String, String), [f32; 3]>;

fn prepare(run_dir: &Path, train: &Path) {
    let out = arenaflow(&[
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("train={}", train.display()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Runs arenaflow with `args` until it has committed `commits` batches, then kills it
/// with SIGKILL.
fn kill_after_commits(args: &[String], commits: usize) {
    kill_at_pause(
        args,
        ("ARENAFLOW_TEST_PAUSE_AFTER_COMMITS", commits),
        &format!("paused after {commits} commits"),
    );
}

fn run_ok(args: &[String]) -> String {
    let out = arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    log
}

fn teacher_args(run_dir: &Path) -> Vec<String> {
    [
        "run",
        "plans/teacher_logits.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("model={MODEL}"),
        "--set",
        &format!("tokenizer={TOKENIZER}"),
        "--set",
        "max_length=96",
        "--set",
        "dtype=f32",
        "--set",
        "max_batch_tokens=512",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Every row of a teacher output folder (split from the hive path) or merged file.
fn read_teacher(path: &Path) -> (Logits, usize) {
    let (mut logits, mut rows) = (Logits::new(), 0);
    for file in parquet_files(path) {
        let split_from_path = file
            .components()
            .filter_map(|c| {
                c.as_os_str()
                    .to_str()?
                    .strip_prefix("split=")
                    .map(String::from)
            })
            .next();
        for batch in parquet_batches(&file) {
            let string = |name: &str| {
                datafusion::arrow::compute::cast(
                    batch.column_by_name(name).unwrap(),
                    &datafusion::arrow::datatypes::DataType::Utf8,
                )
                .unwrap()
            };
            let (ids, orders) = (string("id"), string("order"));
            let splits = batch.column_by_name("split").map(|_| string("split"));
            let values = batch
                .column_by_name("logits")
                .unwrap()
                .as_fixed_size_list()
                .clone();
            for r in 0..batch.num_rows() {
                let split = match &splits {
                    Some(s) => s.as_string::<i32>().value(r).to_string(),
                    None => split_from_path.clone().expect("split in the path"),
                };
                let v = values.value(r);
                let v = v.as_primitive::<Float32Type>().values();
                let key = (
                    ids.as_string::<i32>().value(r).to_string(),
                    orders.as_string::<i32>().value(r).to_string(),
                    split,
                );
                assert!(
                    logits.insert(key.clone(), [v[0], v[1], v[2]]).is_none(),
                    "{key:?} twice"
                );
                rows += 1;
            }
        }
    }
    (logits, rows)
}

fn max_diff(a: &Logits, b: &Logits) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, x)| {
            let y = b.get(k).unwrap_or_else(|| panic!("{k:?} missing"));
            (0..3).map(|i| (x[i] - y[i]).abs()).fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

#[test]
fn teacher_logits_cover_the_fold_resume_after_kill_and_match_single_rows() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 40);
    let (killed, clean) = (dir.path().join("killed"), dir.path().join("clean"));
    prepare(&killed, &train);
    prepare(&clean, &train);

    // Uninterrupted.
    let out = arenaflow(
        &teacher_args(&clean)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("wrote teacher/teacher/fold0/shard=0-of-1: 80 rows, 40 ids"),
        "{log}"
    );
    assert!(
        log.contains("| true    | true | true         | 80   |"),
        "{log}"
    );
    let output = clean.join("teacher/teacher/fold0/shard=0-of-1");
    let (reference, rows) = read_teacher(&output);
    assert_eq!(rows, 80);
    assert_eq!(reference.keys().filter(|k| k.2 == "valid").count(), 20);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(clean.join("manifest.json")).unwrap()).unwrap();
    let record = &manifest["outputs"]["teacher/teacher/fold0/shard=0-of-1"];
    assert_eq!(record["status"], "complete");
    let metrics = &record["metrics"][0];
    assert_eq!(metrics["rows"], 80);
    assert_eq!(metrics["computed_rows"], 80);
    assert!(metrics["tokens"].as_u64().unwrap() > 80 * 40, "{metrics}");
    assert!(
        metrics["padding_percent"].as_f64().unwrap() < 25.0,
        "{metrics}"
    );
    assert!(
        metrics["peak_memory_bytes"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(
        !clean.join(".resume").exists()
            || std::fs::read_dir(clean.join(".resume"))
                .unwrap()
                .next()
                .is_none(),
        "the resume folder is removed once the output is complete"
    );

    // Killed with SIGKILL after two committed batches, then the same command again.
    kill_after_commits(&teacher_args(&killed), 2);
    let manifest = std::fs::read_to_string(killed.join("manifest.json")).unwrap();
    assert!(
        !manifest.contains("teacher/teacher/fold0"),
        "nothing recorded after kill -9"
    );
    let parts = parquet_files(&killed.join(".resume"));
    assert_eq!(parts.len(), 2, "{parts:?}");

    let out = arenaflow(
        &teacher_args(&killed)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("teacher_forward: resuming after"), "{log}");
    let (resumed, rows) = read_teacher(&killed.join("teacher/teacher/fold0/shard=0-of-1"));
    assert_eq!(rows, 80);
    let diff = max_diff(&reference, &resumed);
    assert_eq!(diff, 0.0, "resumed logits differ by {diff}");
    let again = arenaflow(
        &teacher_args(&killed)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        text(&again).contains("up to date: teacher/teacher/fold0/shard=0-of-1"),
        "{}",
        text(&again)
    );

    // Each row alone through `arenaflow logits` (no padding, no batching) gives the same.
    let tokens = arenaflow(&[
        "run",
        "plans/tokenize.sql",
        "--run-dir",
        clean.to_str().unwrap(),
        "--set",
        &format!("tokenizer={TOKENIZER}"),
        "--set",
        "max_length=96",
        "--set",
        "model_name=tiny",
    ]);
    assert!(tokens.status.success(), "{}", text(&tokens));
    let tokens_file = clean.join("tokenize/tiny_blackpearl_96_balanced/tokens.parquet");
    let single = dir.path().join("single.parquet");
    let out = arenaflow(&[
        "logits",
        "--model",
        MODEL,
        "--input",
        tokens_file.to_str().unwrap(),
        "--output",
        single.to_str().unwrap(),
        "--max-batch-tokens",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // tokens.parquet holds both orders of every comparison; logits keeps its row order.
    let orders: Vec<String> = string_columns(&tokens_file, &["order"])
        .into_iter()
        .map(|mut row| row.remove(0))
        .collect();
    let mut compared = 0;
    let mut worst = 0f32;
    for ((id, v), order) in read_logits(&single).into_iter().zip(&orders) {
        for split in ["train", "valid"] {
            let key = (id.clone(), order.clone(), split.to_string());
            if let Some(x) = reference.get(&key) {
                compared += 1;
                worst = (0..3).map(|i| (x[i] - v[i]).abs()).fold(worst, f32::max);
            }
        }
    }
    assert_eq!(compared, 80);
    assert!(worst < 1e-4, "operator vs single rows: {worst}");
}

/// Batches are a function of the rows alone (bf16, rows of many lengths, where the batch a
/// row shares changes its rounding): two uninterrupted runs and a run killed after three
/// commits (one of them then damaged) and resumed give bitwise the same logits, and so does
/// `arenaflow logits` over the same token rows in reverse order.
#[test]
fn teacher_logits_are_bitwise_the_same_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 120);
    let args = |run_dir: &Path| {
        teacher_args(run_dir)
            .into_iter()
            .map(|a| match a.as_str() {
                "dtype=f32" => "dtype=bf16".into(),
                "max_length=96" => "max_length=200".into(),
                "max_batch_tokens=512" => "max_batch_tokens=1200".into(),
                _ => a,
            })
            .collect::<Vec<String>>()
    };
    let mut outputs = Vec::new();
    for name in ["first", "second", "killed"] {
        let run_dir = dir.path().join(name);
        prepare(&run_dir, &train);
        if name == "killed" {
            kill_after_commits(&args(&run_dir), 3);
            // A committed part damaged after the fact is dropped and computed again.
            let parts = parquet_files(&run_dir.join(".resume"));
            assert_eq!(parts.len(), 3, "{parts:?}");
            let bytes = std::fs::read(&parts[1]).unwrap();
            std::fs::write(&parts[1], &bytes[..bytes.len() / 2]).unwrap();
        }
        let log = run_ok(&args(&run_dir));
        assert_eq!(log.contains("resuming after"), name == "killed", "{log}");
        assert_eq!(
            log.contains("dropped the damaged part") && log.contains("part-000001.parquet"),
            name == "killed",
            "{log}"
        );
        let (logits, rows) = read_teacher(&run_dir.join("teacher/teacher/fold0/shard=0-of-1"));
        assert_eq!(rows, 240);
        outputs.push(logits);
    }
    for (name, other) in ["second", "killed"].iter().zip(&outputs[1..]) {
        let differ = bitwise_differences(&outputs[0], other);
        assert!(
            differ.is_empty(),
            "{name}: {} of 240 rows differ: {differ:?}",
            differ.len()
        );
    }

    // The same token rows in reverse order through `arenaflow logits`.
    let run_dir = dir.path().join("first");
    run_ok(&[
        "run".into(),
        "plans/tokenize.sql".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
        "--set".into(),
        format!("tokenizer={TOKENIZER}"),
        "--set".into(),
        "max_length=200".into(),
        "--set".into(),
        "model_name=tiny".into(),
    ]);
    let tokens = run_dir.join("tokenize/tiny_blackpearl_200_balanced/tokens.parquet");
    let reversed = dir.path().join("reversed.parquet");
    reverse_rows(&tokens, &reversed);
    let mut by_key = Vec::new();
    for input in [&tokens, &reversed] {
        let output = dir.path().join("logits.parquet");
        run_ok(&[
            "logits".into(),
            "--model".into(),
            MODEL.into(),
            "--dtype".into(),
            "bf16".into(),
            "--max-batch-tokens".into(),
            "1200".into(),
            "--input".into(),
            input.display().to_string(),
            "--output".into(),
            output.display().to_string(),
        ]);
        let keys = string_columns(input, &["id", "order"]);
        let logits: Logits = read_logits(&output)
            .into_iter()
            .zip(keys)
            .map(|((id, v), key)| {
                assert_eq!(id, key[0]);
                ((id, key[1].clone(), String::new()), [v[0], v[1], v[2]])
            })
            .collect();
        by_key.push(logits);
    }
    assert_eq!(by_key[0].len(), 240);
    let differ = bitwise_differences(&by_key[0], &by_key[1]);
    assert!(
        differ.is_empty(),
        "reversed input: {} of {} rows differ: {differ:?}",
        differ.len(),
        by_key[0].len()
    );
}

/// The keys whose logits are not bitwise equal.
fn bitwise_differences<'a>(a: &'a Logits, b: &Logits) -> Vec<&'a (String, String, String)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .filter(|(k, v)| b[*k].map(f32::to_bits) != v.map(f32::to_bits))
        .map(|(k, _)| k)
        .collect()
}

/// Each row's values of string `columns`, in file order.
fn string_columns(path: &Path, columns: &[&str]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for batch in parquet_batches(path) {
        for r in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| {
                        let column = datafusion::arrow::compute::cast(
                            batch.column_by_name(c).unwrap(),
                            &datafusion::arrow::datatypes::DataType::Utf8,
                        )
                        .unwrap();
                        column.as_string::<i32>().value(r).to_string()
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// Writes the rows of a Parquet file to another in reverse order.
fn reverse_rows(from: &Path, to: &Path) {
    use datafusion::arrow::compute::{concat_batches, take_record_batch};
    let batches = parquet_batches(from);
    let all = concat_batches(&batches[0].schema(), &batches).unwrap();
    let indices =
        datafusion::arrow::array::UInt32Array::from_iter_values((0..all.num_rows() as u32).rev());
    let reversed = take_record_batch(&all, &indices).unwrap();
    write_parquet(to, &[reversed]);
}

/// Changes one byte (`at` into the tensor data) of a safetensors file; it still loads.
fn nudge_weights(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header + at] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

/// The weights are part of the output's fingerprint and of its resume key: replacing
/// `model.safetensors` makes the output again, and a run killed with other weights does not
/// lend its commits to the rerun.
#[test]
fn swapped_weights_are_never_up_to_date_nor_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 30);
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(repo_root().join(MODEL)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let weights = model.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let run_dir = dir.path().join("run");
    prepare(&run_dir, &train);
    let args: Vec<String> = teacher_args(&run_dir)
        .into_iter()
        .map(|a| {
            if a == format!("model={MODEL}") {
                format!("model={}", model.display())
            } else {
                a
            }
        })
        .collect();
    let output = run_dir.join("teacher/teacher/fold0/shard=0-of-1");
    let log = run_ok(&args);
    assert!(
        log.contains("wrote teacher/teacher/fold0/shard=0-of-1: 60 rows"),
        "{log}"
    );
    let (first, _) = read_teacher(&output);

    nudge_weights(&weights, 64);
    let log = run_ok(&args);
    assert!(!log.contains("up to date: teacher/"), "{log}");
    assert!(
        log.contains("wrote teacher/teacher/fold0/shard=0-of-1: 60 rows"),
        "{log}"
    );

    // Killed with the nudged weights, the originals back, the same command again: nothing
    // of the killed run is resumed, and the output is the original weights' bit for bit.
    nudge_weights(&weights, 128);
    kill_after_commits(&args, 2);
    std::fs::write(&weights, &original).unwrap();
    let log = run_ok(&args);
    assert!(!log.contains("resuming after"), "{log}");
    assert!(
        log.contains(
            "the commits of an earlier run of teacher/teacher/fold0/shard=0-of-1 with other inputs"
        ),
        "{log}"
    );
    let left: Vec<_> = std::fs::read_dir(run_dir.join(".resume"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let (again, rows) = read_teacher(&output);
    assert_eq!(rows, 60);
    assert!(bitwise_differences(&first, &again).is_empty());
}

#[test]
fn shards_split_the_rows_and_the_merge_checks_coverage() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 30);
    let run = dir.path().join("run");
    prepare(&run, &train);
    let mut args = teacher_args(&run);
    let args: Vec<&str> = args.iter_mut().map(|s| s.as_str()).collect();
    // Shard 0 by flag, shard 1 as a SLURM array task (ids 1..2, so TASK_MIN matters).
    let mut first = args.clone();
    first.extend(["--shard", "0/2"]);
    let out = arenaflow(&first);
    assert!(out.status.success(), "{}", text(&out));
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "2".to_string()),
        ("SLURM_ARRAY_TASK_MIN", "1".to_string()),
        ("SLURM_ARRAY_TASK_COUNT", "2".to_string()),
    ];
    let out = arenaflow_with_env(&args, &slurm);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("shard=1-of-2"), "{}", text(&out));
    for shard in ["shard-0-of-2", "shard-1-of-2"] {
        let file = run.join(format!("manifest.d/{shard}.json"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
    let (a, rows_a) = read_teacher(&run.join("teacher/teacher/fold0/shard=0-of-2"));
    let (b, rows_b) = read_teacher(&run.join("teacher/teacher/fold0/shard=1-of-2"));
    assert_eq!(rows_a + rows_b, 60);
    assert!(rows_a > 0 && rows_b > 0);
    assert!(a.keys().all(|k| !b.contains_key(k)));

    let merge = |shards: &str| {
        arenaflow(&[
            "run",
            "plans/teacher_merge.sql",
            "--run-dir",
            run.to_str().unwrap(),
            "--set",
            &format!("shards={shards}"),
        ])
    };
    let wrong = merge("3");
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("teacher_merge: expected 3 shards of fold 0, found 2"),
        "{}",
        text(&wrong)
    );
    let out = merge("2");
    assert!(out.status.success(), "{}", text(&out));
    let (merged, rows) = read_teacher(&run.join("teacher/teacher/fold0.parquet"));
    assert_eq!(rows, 60);
    assert_eq!(merged.len(), a.len() + b.len());

    // A plan that does not split by shard refuses to run as one.
    let out = arenaflow(&[
        "run",
        "plans/folds.sql",
        "--run-dir",
        run.to_str().unwrap(),
        "--shard",
        "1/2",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not split its rows by ${shard_index}"),
        "{}",
        text(&out)
    );
}

/// A CUDA device asked of a build without CUDA fails the plan (rule 8: no silent CPU
/// fallback). The operator's other bad inputs are in `tests/slt/teacher_forward.slt`.
#[test]
fn a_missing_device_fails_the_plan() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("cuda.sql");
    std::fs::write(
        &plan,
        format!("CREATE TABLE t AS SELECT 'a' AS id, 'ab' AS \"order\", [1] AS input_ids;\nSELECT * FROM teacher_forward('t', '{MODEL}', '', 'bf16', 'cuda:0');\n"),
    )
    .unwrap();
    let out = arenaflow(&[
        "run",
        plan.to_str().unwrap(),
        "--run-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("device cuda:0: this arenaflow was built without CUDA"),
        "{said}"
    );
}

/// `--devices`: one worker per device over the sharded plan, side by side in one run
/// directory; the merge finds both shards covering every row once, with the logits of a
/// single run (the same rows batched otherwise: f32 within 1e-5). Plans that cannot be
/// split, and a device given twice, are refused before any worker starts.
#[test]
fn one_worker_per_device_covers_the_fold_as_one_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 30);
    let single = dir.path().join("single");
    prepare(&single, &train);
    let out = arenaflow(
        &teacher_args(&single)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let (one, _) = read_teacher(&single.join("teacher/teacher/fold0/shard=0-of-1"));

    let run = dir.path().join("run");
    prepare(&run, &train);
    let mut args = teacher_args(&run);
    args.extend(["--devices".to_string(), "cpu,cpu".to_string()]);
    let out = arenaflow(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for shard in [
        "[shard 0/2 cpu] wrote teacher/teacher/fold0/shard=0-of-2",
        "[shard 1/2 cpu] wrote teacher/teacher/fold0/shard=1-of-2",
        "2 workers done",
    ] {
        assert!(log.contains(shard), "{shard} not in\n{log}");
    }
    let out = arenaflow(&[
        "run",
        "plans/teacher_merge.sql",
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        "shards=2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (merged, rows) = read_teacher(&run.join("teacher/teacher/fold0.parquet"));
    assert_eq!(rows, 60);
    assert_eq!(merged.len(), one.len());
    assert!(merged.values().flatten().all(|v| v.is_finite()));
    let worst = one
        .iter()
        .flat_map(|(k, v)| v.iter().zip(&merged[k]).map(|(a, b)| (a - b).abs()))
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "merged shards differ from one run by {worst}");

    let refuse = |extra: &[&str], plan: &str, want: &str| {
        let mut args = vec!["run", plan, "--run-dir", run.to_str().unwrap()];
        args.extend(extra);
        let out = arenaflow(&args);
        assert!(!out.status.success());
        assert!(text(&out).contains(want), "{want} not in\n{}", text(&out));
    };
    refuse(
        &["--devices", "cpu,cpu"],
        "plans/folds.sql",
        "has no parameter device",
    );
    refuse(
        &["--devices", "cuda:0,cuda:0"],
        "plans/teacher_logits.sql",
        "cuda:0 is listed twice",
    );
}
