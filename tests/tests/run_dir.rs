//! The run directory's records are checked against the files: a deleted, truncated or
//! replaced output is never "up to date", and a corrupt manifest says how to recover.

use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arenaflow_tests::{arenaflow, arenaflow_bin, repo_root, shared, text};

/// The first `n` rows of the real Kaggle sample, as a CSV of their own.
fn small_train(dir: &Path, n: usize) -> PathBuf {
    let mut reader = csv::Reader::from_path(shared("data/lmsys-arena/train_sample.csv")).unwrap();
    let path = dir.join("train.csv");
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    for record in reader.records().take(n) {
        writer.write_record(&record.unwrap()).unwrap();
    }
    writer.flush().unwrap();
    path
}

/// `prepare.sql` + `folds.sql` on `train` into `run_dir`, with `extra` arguments: (success,
/// log).
fn prepare_and_folds(run_dir: &Path, train: &Path, extra: &[&str]) -> (bool, String) {
    let train = format!("train={}", train.display());
    let mut args = vec![
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &train,
    ];
    args.extend(extra);
    let out = arenaflow(&args);
    (out.status.success(), text(&out))
}

fn fold_files(run_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(run_dir.join("folds/k5_seed2025_swaptrue")).unwrap() {
        let part = entry.unwrap().path();
        for file in std::fs::read_dir(&part).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files.sort();
    files
}

#[test]
fn changed_outputs_are_never_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 200);
    let run_dir = dir.path().join("run");
    let (ok, log) = prepare_and_folds(&run_dir, &train, &[]);
    assert!(ok, "{log}");
    let (ok, log) = prepare_and_folds(&run_dir, &train, &[]);
    assert!(ok, "{log}");
    assert!(
        log.contains("up to date: prepare/comparisons.parquet"),
        "{log}"
    );
    assert!(
        log.contains("up to date: folds/k5_seed2025_swaptrue"),
        "{log}"
    );

    let comparisons = run_dir.join("prepare/comparisons.parquet");
    let original = std::fs::read(&comparisons).unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    assert!(prepare_and_folds(&small, &small_train(&small, 20), &[]).0);
    let other = std::fs::read(small.join("prepare/comparisons.parquet")).unwrap();
    let folds = fold_files(&run_dir);
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "a deleted fold partition",
            Box::new(|| std::fs::remove_file(&folds[1]).unwrap()),
            "is missing",
        ),
        (
            "a truncated comparisons.parquet",
            Box::new(|| std::fs::write(&comparisons, &original[..original.len() / 2]).unwrap()),
            "prepare/comparisons.parquet has",
        ),
        (
            "comparisons.parquet replaced by another run's",
            Box::new(|| std::fs::write(&comparisons, &other).unwrap()),
            "prepare/comparisons.parquet",
        ),
    ];
    for (what, damage, expected) in cases {
        damage();
        let (ok, log) = prepare_and_folds(&run_dir, &train, &[]);
        assert!(!ok, "{what}: {log}");
        assert!(
            log.contains("is recorded complete, but") && log.contains(expected),
            "{what}: {log}"
        );
        assert!(log.contains("pass --force"), "{what}: {log}");
        let (ok, log) = prepare_and_folds(&run_dir, &train, &["--force"]);
        assert!(ok, "{what}: {log}");
        assert!(log.contains("making "), "{what}: {log}");
        let (ok, log) = prepare_and_folds(&run_dir, &train, &[]);
        assert!(ok && !log.contains("wrote "), "{what}: {log}");
        assert_eq!(std::fs::read(&comparisons).unwrap(), original, "{what}");
    }

    std::fs::write(run_dir.join("manifest.json"), b"{\"version\": 1, \"outp").unwrap();
    let (ok, log) = prepare_and_folds(&run_dir, &train, &[]);
    assert!(!ok);
    assert!(
        log.contains("is not a valid manifest") && log.contains("move it aside"),
        "{log}"
    );
}

/// A second run on a run directory that another run is writing stops at once, naming the
/// run that holds the lock; the first finishes, and a rerun finds its outputs up to date.
#[test]
fn one_writer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_train(dir.path(), 1982);
    let run_dir = dir.path().join("run");
    let train_arg = format!("train={}", train.display());
    let args = [
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &train_arg,
    ];
    let first = Command::new(arenaflow_bin())
        .args(args)
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first_pid = first.id();
    let lock = run_dir.join(".locks/main.lock");
    let started = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("\"since\"")) {
        assert!(started.elapsed() < Duration::from_secs(60), "no lock taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = arenaflow(&args);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    let log = text(&second);
    assert!(!second.status.success(), "{log}");
    assert!(
        log.contains("another run holds the lock") && log.contains(&format!("pid {first_pid}")),
        "{log}"
    );
    let third = arenaflow(&args);
    let log = text(&third);
    assert!(third.status.success(), "{log}");
    assert!(
        log.contains("up to date: folds/k5_seed2025_swaptrue"),
        "{log}"
    );
}
