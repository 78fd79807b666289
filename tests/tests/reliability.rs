//! The reliability suite (bounded in time): the whole front of the recipe (prepare, folds,
//! tokenize, teacher_logits with the tiny teacher) killed with SIGKILL at seeded random
//! moments and run again until it completes gives bitwise the same outputs as an
//! uninterrupted run; two runs at once on one run directory (one plan, or two plans) never
//! both write. Corrupted and deleted outputs are in `run_dir.rs`, swapped weights and
//! damaged resume parts in `teacher_forward.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arenaflow_tests::{
    arenaflow, arenaflow_bin, parquet_batches, parquet_files, repo_root, small_train, text,
};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

const MODEL: &str = "tests/fixtures/teacher/model";
const TOKENIZER: &str = "tests/fixtures/teacher/tokenizer.json";
/// The managed outputs of the four plans.
const OUTPUTS: [&str; 4] = [
    "prepare/comparisons.parquet",
    "folds/k5_seed2025_swaptrue",
    "tokenize/teacher_blackpearl_160_balanced/tokens.parquet",
    "teacher/teacher/fold0/shard=0-of-1",
];

fn args(run_dir: &Path, train: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "plans/tokenize.sql",
        "plans/teacher_logits.sql",
        "--run-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(run_dir.display().to_string());
    for set in [
        format!("train={}", train.display()),
        format!("model={MODEL}"),
        format!("tokenizer={TOKENIZER}"),
        "model_name=teacher".into(),
        "max_length=160".into(),
        "dtype=bf16".into(),
        "max_batch_tokens=640".into(),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args
}

/// Every row of an output (a file, or the Parquet files under a folder, with the hive
/// partition of each file's path), each as one line of text with every value, sorted:
/// equal dumps are bitwise equal contents (floats print to the last bit).
fn dump(path: &Path) -> Vec<String> {
    let options = FormatOptions::default();
    let mut rows = Vec::new();
    for file in parquet_files(path) {
        let partition = file
            .strip_prefix(path)
            .map(|p| p.parent().unwrap_or(Path::new("")).display().to_string())
            .unwrap_or_default();
        for batch in parquet_batches(&file) {
            let formatters: Vec<_> = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
                .collect();
            for r in 0..batch.num_rows() {
                let mut row = partition.clone();
                for f in &formatters {
                    row.push('\t');
                    row.push_str(&f.value(r).to_string());
                }
                rows.push(row);
            }
        }
    }
    rows.sort();
    rows
}

/// A small deterministic generator (splitmix64) for the kill moments.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[test]
fn killed_at_random_moments_the_outputs_are_bitwise_those_of_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 60);

    let clean = dir.path().join("clean");
    let started = Instant::now();
    let out = arenaflow(
        &args(&clean, &train)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let whole = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    let reference: BTreeMap<&str, Vec<String>> =
        OUTPUTS.iter().map(|o| (*o, dump(&clean.join(o)))).collect();
    assert_eq!(reference[OUTPUTS[3]].len(), 120);

    let mut random = Seeded(2025);
    let (mut runs, mut kills, mut identical) = (1, 0, 0);
    for attempt in 0..4 {
        let run_dir = dir.path().join(format!("killed{attempt}"));
        // Killed at 4 moments drawn over the uninterrupted run's length, each run picking
        // up where the one before it stopped, then run to the end.
        for _ in 0..4 {
            let at = Duration::from_millis(random.next() % whole.as_millis().max(1) as u64);
            let mut child = Command::new(arenaflow_bin())
                .args(args(&run_dir, &train))
                .current_dir(repo_root())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(at);
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            runs += 1;
            kills += 1;
        }
        let out = arenaflow(
            &args(&run_dir, &train)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        runs += 1;
        assert!(out.status.success(), "attempt {attempt}: {}", text(&out));
        for output in OUTPUTS {
            assert_eq!(
                dump(&run_dir.join(output)),
                reference[output],
                "attempt {attempt}: {output} differs from the uninterrupted run's"
            );
            identical += 1;
        }
    }
    eprintln!(
        "reliability: {runs} runs, {kills} kills at random moments, {identical} of {} outputs bitwise identical to the uninterrupted run's",
        4 * OUTPUTS.len()
    );
}

/// While a run writes a run directory, a second run of the same plans and a run of another
/// plan both stop at once naming the holder; every record is kept.
#[test]
fn a_second_run_of_any_plan_waits_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 1982);
    let run_dir = dir.path().join("run");
    let train_arg = format!("train={}", train.display());
    let first_args = [
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &train_arg,
    ];
    let first = Command::new(arenaflow_bin())
        .args(first_args)
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id();
    let lock = run_dir.join(".locks/main.lock");
    let started = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("\"since\"")) {
        assert!(started.elapsed() < Duration::from_secs(60), "no lock taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tokenize_args = [
        "run",
        "plans/tokenize.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("tokenizer={TOKENIZER}"),
    ];
    let same = arenaflow(&first_args);
    let other = arenaflow(&tokenize_args);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    for (what, out) in [("the same plans", same), ("another plan", other)] {
        let log = text(&out);
        assert!(!out.status.success(), "{what}: {log}");
        assert!(
            log.contains("another run holds the lock") && log.contains(&format!("pid {pid}")),
            "{what}: {log}"
        );
    }
    let out = arenaflow(&tokenize_args);
    assert!(out.status.success(), "{}", text(&out));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap())
            .unwrap();
    let recorded: Vec<&String> = manifest["outputs"].as_object().unwrap().keys().collect();
    assert_eq!(recorded.len(), 3, "{recorded:?}");
}
