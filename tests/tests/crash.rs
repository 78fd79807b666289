//! kill -9 at any moment leaves nothing the manifest calls complete that is not; the
//! same command then finishes the job.

use std::process::Command;
use std::time::Duration;

use arenaflow_tests::{arenaflow, arenaflow_bin, repo_root, shared, text};
use serde_json::Value;

#[test]
fn killed_runs_leave_no_complete_looking_output() {
    let dir = tempfile::tempdir().unwrap();
    // The real sample ten times over with fresh ids: long enough to be killed mid-run.
    let mut reader = csv::ReaderBuilder::new()
        .from_path(shared("data/lmsys-arena/train_sample.csv"))
        .unwrap();
    let header = reader.byte_headers().unwrap().clone();
    let records: Vec<_> = reader.byte_records().map(Result::unwrap).collect();
    let big = dir.path().join("big.csv");
    let mut writer = csv::Writer::from_path(&big).unwrap();
    writer.write_byte_record(&header).unwrap();
    for copy in 0..10 {
        for record in &records {
            let mut fields: Vec<Vec<u8>> = record.iter().map(<[u8]>::to_vec).collect();
            fields[0] = format!("{copy}-{}", String::from_utf8_lossy(&fields[0])).into_bytes();
            writer.write_record(&fields).unwrap();
        }
    }
    writer.flush().unwrap();
    let run_dir = dir.path().join("run");
    let args = [
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("train={}", big.display()),
    ];

    for delay_ms in [300, 900, 1500, 2500, 4000] {
        let mut child = Command::new(arenaflow_bin())
            .args(args)
            .current_dir(repo_root())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let Ok(manifest) = std::fs::read_to_string(run_dir.join("manifest.json")) else {
            continue;
        };
        let manifest: Value = serde_json::from_str(&manifest).unwrap();
        for (key, record) in manifest["outputs"].as_object().unwrap() {
            if record["status"] == "complete" {
                assert!(
                    run_dir.join(key).exists(),
                    "after kill at {delay_ms} ms: {key} is recorded complete but missing"
                );
            }
        }
    }
    // What a COPY killed midway leaves in staging (as a kill may, or may not, have left
    // here): the next run, holding the lock, removes it.
    for leftover in [
        format!("main-{}", uuid::Uuid::new_v4()),
        uuid::Uuid::new_v4().to_string(),
    ] {
        let dir = run_dir.join(".staging").join(leftover).join("prepare");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comparisons.parquet"), b"PAR1 cut short").unwrap();
    }
    let output = arenaflow(&args);
    assert!(output.status.success(), "{}", text(&output));
    let staging: Vec<_> = std::fs::read_dir(run_dir.join(".staging"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "{staging:?}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap())
            .unwrap();
    let prepare = &manifest["outputs"]["prepare/comparisons.parquet"];
    assert_eq!(
        (
            prepare["status"].as_str(),
            prepare["rows"].as_i64(),
            prepare["distinct_ids"].as_i64()
        ),
        (Some("complete"), Some(19_820), Some(19_820))
    );
    let folds = &manifest["outputs"]["folds/k5_seed2025_swaptrue"];
    assert_eq!(
        (folds["status"].as_str(), folds["distinct_ids"].as_i64()),
        (Some("complete"), Some(19_820))
    );
}
