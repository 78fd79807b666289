//! Parse + normalise + fold of the real Kaggle rows replicated to 57,477 rows (the size of
//! the full train.csv) with fresh ids: `arena_csv` into the canonical table, then the
//! stratified `fold_of`, every column collected in memory.
//!
//! `benches/prepare_vs_pandas.sh` runs this beside the pandas script on the same file.
//! Without `ARENAFLOW_BENCH_CSV` the replicated file is written to a temporary folder.

use std::path::PathBuf;

use arenaflow_engine::ArenaSession;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ROWS: usize = 57_477;

fn replicated_csv(dir: &std::path::Path) -> PathBuf {
    let sample = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/lmsys-arena/train_sample.csv");
    let mut reader = csv::Reader::from_path(&sample).expect("read the real sample");
    let header = reader.byte_headers().expect("header").clone();
    let records: Vec<_> = reader.byte_records().map(|r| r.expect("record")).collect();
    let path = dir.join("train_57477.csv");
    let mut writer = csv::Writer::from_path(&path).expect("write the replicated CSV");
    writer.write_byte_record(&header).expect("header");
    for (i, record) in records.iter().cycle().take(ROWS).enumerate() {
        let copy = i / records.len();
        let mut fields: Vec<Vec<u8>> = record.iter().map(<[u8]>::to_vec).collect();
        let id: u64 = String::from_utf8_lossy(&fields[0])
            .parse()
            .expect("numeric Kaggle id");
        fields[0] = (copy as u64 * 10_000_000_000 + id).to_string().into_bytes();
        writer.write_record(&fields).expect("record");
    }
    writer.flush().expect("flush");
    path
}

fn prepare(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let csv = std::env::var("ARENAFLOW_BENCH_CSV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| replicated_csv(dir.path()));
    let sql = format!(
        "SELECT *, fold_of(id, 5, 2025) OVER (PARTITION BY label) AS fold FROM arena_csv('{}')",
        csv.display()
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("prepare");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("parse_normalise_fold_57477", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let session = ArenaSession::new();
                let batches = session
                    .ctx
                    .sql(&sql)
                    .await
                    .expect("plan")
                    .collect()
                    .await
                    .expect("run");
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                assert_eq!(rows, ROWS);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, prepare);
criterion_main!(benches);
