//! The run directory's records are checked against the files: a deleted, truncated or
//! replaced output is never "up to date", and a corrupt manifest says how to recover.
//! (Two runs at once: `reliability.rs`.)

use std::path::{Path, PathBuf};

use arenaflow_tests::{arenaflow, small_train, text};

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
