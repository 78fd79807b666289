//! prepare.sql + folds.sql on the real Kaggle sample, through the CLI.

use std::collections::{BTreeMap, HashMap};

use arenaflow_tests::{arenaflow, shared, text};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{DataType, Int32Type, Int64Type, Int8Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde_json::Value;

const TRAIN_ROWS: i64 = 1982;

fn run_pipeline(run_dir: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "plans/prepare.sql",
        "plans/folds.sql",
        "--run-dir",
        run_dir,
    ];
    args.extend_from_slice(extra);
    arenaflow(&args)
}

async fn folds_table(run_dir: &str) -> SessionContext {
    let ctx = SessionContext::new();
    let options = ParquetReadOptions::default()
        .table_partition_cols(vec![("fold".to_string(), DataType::Int32)]);
    ctx.register_parquet(
        "folds",
        format!("{run_dir}/folds/k5_seed2025_swaptrue/"),
        options,
    )
    .await
    .unwrap();
    ctx.register_parquet(
        "comparisons",
        format!("{run_dir}/prepare/comparisons.parquet"),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    ctx
}

/// Rows of (i64, i64, ...) from a query whose columns are all integers.
async fn int_rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<i64>> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| datafusion::arrow::compute::cast(c, &DataType::Int64).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| c.as_primitive::<Int64Type>().value(row))
                    .collect(),
            );
        }
    }
    rows
}

fn read_manifest(run_dir: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{run_dir}/manifest.json")).unwrap())
        .unwrap()
}

#[tokio::test]
async fn real_sample_labels_folds_and_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run_dir = run_dir.to_str().unwrap();
    let output = run_pipeline(run_dir, &[]);
    assert!(output.status.success(), "{}", text(&output));
    let ctx = folds_table(run_dir).await;

    let labels = int_rows(
        &ctx,
        "SELECT label, count(*) FROM comparisons GROUP BY label ORDER BY label",
    )
    .await;
    assert_eq!(labels, vec![vec![0, 690], vec![1, 692], vec![2, 600]]);

    // Every fold holds each label within one row of the others' share.
    let held_out = int_rows(&ctx, "SELECT label, fold, count(*) FROM folds WHERE split = 'valid' GROUP BY label, fold ORDER BY label, fold").await;
    assert_eq!(held_out.len(), 15);
    for label in 0..3 {
        let counts: Vec<i64> = held_out
            .iter()
            .filter(|r| r[0] == label)
            .map(|r| r[2])
            .collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            max - min <= 1,
            "label {label}: held-out counts per fold {counts:?}"
        );
    }
    // The held-out sides partition the train rows: each id held out exactly once.
    assert_eq!(
        int_rows(
            &ctx,
            "SELECT count(*), count(DISTINCT id) FROM folds WHERE split = 'valid'"
        )
        .await,
        vec![vec![TRAIN_ROWS, TRAIN_ROWS]]
    );

    // Swap doubles the training side, and the copy's label is swapped.
    for fold in 0..5 {
        let sides = int_rows(&ctx, &format!("SELECT count(*) FILTER (WHERE split = 'valid'), count(*) FILTER (WHERE split = 'train' AND \"order\" = 'ab'), count(*) FILTER (WHERE split = 'train' AND \"order\" = 'ba') FROM folds WHERE fold = {fold}")).await;
        let [valid, ab, ba] = [sides[0][0], sides[0][1], sides[0][2]];
        assert_eq!(ab, TRAIN_ROWS - valid, "fold {fold}");
        assert_eq!(
            ba, ab,
            "fold {fold}: the swapped copy doubles the training side"
        );
    }
    let mismatched = int_rows(&ctx, "SELECT count(*) FROM folds a JOIN folds b ON a.id = b.id AND a.fold = b.fold AND a.\"order\" = 'ab' AND b.\"order\" = 'ba' \
        WHERE NOT (b.label = CASE a.label WHEN 0 THEN 1 WHEN 1 THEN 0 ELSE 2 END AND a.response_a = b.response_b AND a.response_b = b.response_a AND a.model_a = b.model_b)").await;
    assert_eq!(mismatched, vec![vec![0]]);
    assert_eq!(int_rows(&ctx, "SELECT count(*) FROM folds a JOIN folds b ON a.id = b.id AND a.fold = b.fold AND a.\"order\" = 'ab' AND b.\"order\" = 'ba'").await, vec![vec![4 * TRAIN_ROWS]]);

    // The manifest records both outputs as complete with their counts and inputs.
    let manifest = read_manifest(run_dir);
    let prepare = &manifest["outputs"]["prepare/comparisons.parquet"];
    assert_eq!(
        (
            prepare["status"].as_str(),
            prepare["rows"].as_i64(),
            prepare["distinct_ids"].as_i64()
        ),
        (Some("complete"), Some(TRAIN_ROWS), Some(TRAIN_ROWS))
    );
    assert_eq!(
        prepare["inputs"][0]["sha256"],
        "ac9766ec2178f13bee6ff597107623b61c86d17e8b47537daf3991e767c204b7"
    );
    let folds = &manifest["outputs"]["folds/k5_seed2025_swaptrue"];
    assert_eq!(
        (
            folds["status"].as_str(),
            folds["rows"].as_i64(),
            folds["distinct_ids"].as_i64()
        ),
        (
            Some("complete"),
            Some(TRAIN_ROWS + 2 * 4 * TRAIN_ROWS),
            Some(TRAIN_ROWS)
        )
    );
    assert_eq!(folds["params"]["k"], "5");

    // Rerunning with identical inputs does nothing and says so.
    let again = run_pipeline(run_dir, &[]);
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    assert!(
        said.contains("up to date: prepare/comparisons.parquet")
            && said.contains("all 1 outputs up to date"),
        "{said}"
    );
    assert_eq!(
        read_manifest(run_dir)["outputs"],
        manifest["outputs"],
        "a rerun must not rewrite anything"
    );

    // Other parameters writing to the same path is refused, and allowed with --force.
    let clash = arenaflow(&[
        "run",
        "plans/prepare.sql",
        "--run-dir",
        run_dir,
        "--set",
        "on_error=skip",
    ]);
    assert!(!clash.status.success());
    assert!(
        text(&clash).contains("would overwrite it"),
        "{}",
        text(&clash)
    );
    // Another stage writing to a recorded output is refused too.
    let rogue = dir.path().join("rogue.sql");
    std::fs::write(&rogue, "-- stage rogue\nCOPY (SELECT '1' AS id) TO '${run_dir}/prepare/comparisons.parquet' STORED AS PARQUET;\n").unwrap();
    let clash = arenaflow(&["run", rogue.to_str().unwrap(), "--run-dir", run_dir]);
    assert!(!clash.status.success());
    assert!(
        text(&clash).contains("is the output of stage prepare"),
        "{}",
        text(&clash)
    );
    assert_eq!(
        read_manifest(run_dir)["outputs"]["prepare/comparisons.parquet"]["rows"],
        TRAIN_ROWS
    );

    let forced = arenaflow(&[
        "run",
        "plans/prepare.sql",
        "--run-dir",
        run_dir,
        "--set",
        "on_error=skip",
        "--force",
    ]);
    assert!(forced.status.success(), "{}", text(&forced));
}

/// The same id lands in the same fold whatever the order of the input rows.
#[tokio::test]
async fn folds_do_not_depend_on_row_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut reader = csv::ReaderBuilder::new()
        .from_path(shared("data/lmsys-arena/train_sample.csv"))
        .unwrap();
    let header = reader.byte_headers().unwrap().clone();
    let mut records: Vec<_> = reader.byte_records().map(Result::unwrap).collect();
    records.reverse();
    let reversed = dir.path().join("reversed.csv");
    let mut writer = csv::Writer::from_path(&reversed).unwrap();
    writer.write_byte_record(&header).unwrap();
    records
        .iter()
        .for_each(|r| writer.write_byte_record(r).unwrap());
    writer.flush().unwrap();

    let mut assignments = Vec::new();
    for (name, train) in [
        ("a", shared("data/lmsys-arena/train_sample.csv")),
        ("b", reversed),
    ] {
        let run_dir = dir.path().join(name);
        let run_dir = run_dir.to_str().unwrap();
        let output = run_pipeline(run_dir, &["--set", &format!("train={}", train.display())]);
        assert!(output.status.success(), "{}", text(&output));
        let ctx = folds_table(run_dir).await;
        let batches = ctx
            .sql("SELECT id, fold FROM folds WHERE split = 'valid'")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut folds = BTreeMap::new();
        for b in batches {
            let ids = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            for row in 0..b.num_rows() {
                folds.insert(
                    ids.as_string::<i32>().value(row).to_string(),
                    b.column(1).as_primitive::<Int32Type>().value(row),
                );
            }
        }
        assignments.push(folds);
    }
    assert_eq!(assignments[0].len(), 1982);
    assert_eq!(assignments[0], assignments[1]);
}

/// Extra sources join every training side, never the held-out side; prompts equal to a
/// train prompt are dropped.
#[tokio::test]
async fn extra_sources_train_only() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run_dir = run_dir.to_str().unwrap();
    let pandalm = shared("data/pandalm/pandalm_testset-v1.json");
    let hh = shared("data/hh-rlhf/hh-rlhf_harmless-base_test.jsonl.gz");
    // UltraFeedback in Kaggle format (post-pretraining data): loaded, never in the folds.
    let ultrafeedback = dir.path().join("ultrafeedback.csv");
    std::fs::write(&ultrafeedback, "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n\
        uf-1,m1,m2,\"[\"\"Say hi\"\"]\",\"[\"\"hi\"\"]\",\"[\"\"hello\"\"]\",1,0,0\n\
        uf-2,m1,m2,\"[\"\"Count to 2\"\"]\",\"[\"\"1 2\"\"]\",\"[\"\"1, 2\"\"]\",0,0,1\n").unwrap();
    let output = run_pipeline(
        run_dir,
        &[
            "--set",
            &format!("ultrafeedback={}", ultrafeedback.display()),
            "--set",
            &format!("pandalm={}", pandalm.display()),
            "--set",
            &format!("hh_rlhf={}", hh.display()),
        ],
    );
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    let ctx = folds_table(run_dir).await;
    let by_source = ctx.sql("SELECT source, label, count(*) FROM comparisons GROUP BY source, label ORDER BY source, label").await.unwrap().collect().await.unwrap();
    let mut counts: HashMap<(String, i8), i64> = HashMap::new();
    for b in by_source {
        let sources = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        for row in 0..b.num_rows() {
            counts.insert(
                (
                    sources.as_string::<i32>().value(row).to_string(),
                    b.column(1).as_primitive::<Int8Type>().value(row),
                ),
                b.column(2).as_primitive::<Int64Type>().value(row),
            );
        }
    }
    // PandaLM majority: 422 response1 (A), 472 response2 (B), 105 ties.
    assert_eq!(
        [
            counts[&("pandalm".into(), 0)],
            counts[&("pandalm".into(), 1)],
            counts[&("pandalm".into(), 2)]
        ],
        [422, 472, 105]
    );
    // HH-RLHF: 2,312 pairs, no ties, chosen on A or B by the seeded coin; one prompt
    // ("tell me a sexist joke", line 522) is also a Kaggle train prompt and is dropped.
    let (a, b) = (
        counts[&("hh_rlhf".into(), 0)],
        counts[&("hh_rlhf".into(), 1)],
    );
    assert_eq!(a + b, 2311);
    let dropped = int_rows(
        &ctx,
        "SELECT count(*) FROM comparisons WHERE id = 'hh-rlhf_harmless-base_test:522'",
    )
    .await;
    assert_eq!(dropped, vec![vec![0]]);
    assert!(
        a > 1000 && b > 1000,
        "chosen on A {a} times, on B {b} times"
    );
    assert!(!counts.contains_key(&("hh_rlhf".into(), 2)));
    let ultrafeedback_rows = int_rows(&ctx, "SELECT (SELECT count(*) FROM comparisons WHERE source = 'ultrafeedback') AS loaded, (SELECT count(*) FROM folds WHERE source = 'ultrafeedback') AS in_folds").await;
    assert_eq!(ultrafeedback_rows, vec![vec![2, 0]]);
    let held_out_extra = int_rows(
        &ctx,
        "SELECT count(*) FROM folds WHERE split = 'valid' AND source <> 'kaggle'",
    )
    .await;
    assert_eq!(held_out_extra, vec![vec![0]]);
    let per_fold = int_rows(&ctx, "SELECT count(DISTINCT fold) , count(*) FROM folds WHERE source = 'pandalm' AND \"order\" = 'ab'").await;
    assert_eq!(per_fold, vec![vec![5, 5 * 999]]);
}
