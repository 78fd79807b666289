//! `TeacherForwardExec` in process: the fixture rows through the plan node, batch by batch
//! under a small token budget, against transformers' logits for the same rows
//! (`tests/fixtures/models/make_fixtures.py`), and its figures from the plan metrics.

use std::path::PathBuf;
use std::sync::Arc;

use arenaflow_operators::scaffold::OperatorExec;
use arenaflow_operators::teacher_forward::exec::TeacherForward;
use arenaflow_operators::teacher_forward::{PaddingSide, TeacherSettings};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, ListBuilder, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema};
use datafusion::catalog::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::{collect, ExecutionPlan};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/llama")
        .join(path)
}

/// The reference rows as `id`, `order`, `input_ids`, `source` (a column passed through).
fn input(rows: &[Vec<i32>]) -> RecordBatch {
    let mut tokens = ListBuilder::new(Int32Builder::new());
    for row in rows {
        tokens.append_value(row.iter().map(|&t| Some(t)));
    }
    let ids: Vec<String> = (0..rows.len()).map(|i| format!("row{i}")).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("order", DataType::Utf8, false),
        Field::new(
            "input_ids",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true))),
            true,
        ),
        Field::new("source", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(StringArray::from(vec!["ab"; rows.len()])),
        Arc::new(tokens.finish()),
        Arc::new(StringArray::from(vec!["fixture"; rows.len()])),
    ];
    RecordBatch::try_new(schema, columns).unwrap()
}

#[tokio::test]
async fn teacher_forward_exec_matches_transformers() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let rows: Vec<Vec<i32>> = serde_json::from_value(reference["rows"].clone()).unwrap();
    let batch = input(&rows);
    for (padding, side) in [("right", PaddingSide::Right), ("left", PaddingSide::Left)] {
        let expected: Vec<Vec<f32>> =
            serde_json::from_value(reference["base"][padding].clone()).unwrap();
        let mut settings = TeacherSettings::new(fixture("base").display().to_string());
        settings.dtype = "f32".into();
        settings.padding = side;
        // 20 padded tokens per pass: the four rows (13, 7, 10, 3 tokens) go in three batches.
        settings.max_batch_tokens = 20;
        let source =
            MemorySourceConfig::try_new_exec(&[vec![batch.clone()]], batch.schema(), None).unwrap();
        let exec =
            Arc::new(OperatorExec::try_new(Arc::new(TeacherForward { settings }), source).unwrap());
        let out = collect(exec.clone(), Arc::new(TaskContext::default()))
            .await
            .unwrap();
        let mut seen = 0;
        for b in &out {
            let schema = b.schema();
            assert_eq!(
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>(),
                ["id", "order", "logits", "source"]
            );
            let ids = b.column(0).as_string::<i32>();
            let logits = b.column(2).as_fixed_size_list();
            for r in 0..b.num_rows() {
                let i: usize = ids.value(r).trim_start_matches("row").parse().unwrap();
                let got = logits.value(r);
                let got = got.as_primitive::<Float32Type>().values();
                for (g, e) in got.iter().zip(&expected[i]) {
                    assert!(
                        (g - e).abs() <= 1e-4,
                        "{padding} row {i}: {got:?} vs {:?}",
                        expected[i]
                    );
                }
                assert_eq!(b.column(1).as_string::<i32>().value(r), "ab");
                assert_eq!(b.column(3).as_string::<i32>().value(r), "fixture");
                seen += 1;
            }
        }
        assert_eq!(seen, rows.len());
        let figures = exec.operator().figures(&exec.metrics().unwrap());
        assert_eq!(figures.rows, 4);
        assert_eq!(figures.computed_rows, 4);
        assert_eq!(figures.resumed_rows, 0);
        assert_eq!(figures.tokens, 33);
        // Longest first under 20 padded tokens: [13], [10, 7], [3] -> 13 + 2 * 10 + 3.
        assert_eq!(figures.batches, 3);
        assert_eq!(figures.padded_tokens, 36);
        assert!(out.iter().all(|b| b.column(2).null_count() == 0));
    }
}

/// The planner sorts the operator's input by (id, order), so that rows arriving from
/// several partitions in any order form the same batches (bitwise the same logits).
#[tokio::test]
async fn teacher_forward_input_comes_sorted_by_id_and_order() {
    use arenaflow_operators::scaffold::{find_operators, OperatorTable};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    let batch = input(&[vec![1, 2, 3], vec![4, 5], vec![6]]);
    let parts = vec![vec![batch.slice(2, 1)], vec![batch.slice(0, 2)]];
    let rows = Arc::new(MemTable::try_new(batch.schema(), parts).unwrap());
    let settings = TeacherSettings::new(fixture("base").display().to_string());
    let table = OperatorTable::try_new(TeacherForward { settings }, rows).unwrap();
    let ctx = SessionContext::new();
    ctx.register_table("logits", Arc::new(table)).unwrap();
    let plan = ctx
        .sql("SELECT id, logits FROM logits")
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let exec = find_operators::<TeacherForward>(&plan)[0];
    let ordering = exec.children()[0]
        .properties()
        .output_ordering()
        .map(|o| o.to_string())
        .unwrap_or_default();
    assert_eq!(ordering, "id@0 ASC NULLS LAST, order@1 ASC NULLS LAST");
}
