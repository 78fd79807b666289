//! The tokenize operator's work on the 1,982 real Kaggle rows replicated ten times
//! (19,820 rows): the blackpearl template, max length 1,024, balanced truncation, with the
//! real Llama-3 and Gemma-2 tokenizers, in record batches of 8,192 rows on all cores.
//!
//! `benches/tokenize_vs_python.sh` runs it beside benches/tokenize_reference.py (the same
//! template and truncation over Python's Hugging Face `tokenizers`, batched).

use std::path::PathBuf;
use std::sync::Arc;

use arenaflow_operators::tokenize::exec::{output_schema, tokenize_batch};
use arenaflow_operators::tokenize::{Encoder, Order, Template, TextTokenizer, Truncation};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datafusion::arrow::array::{Array, ListBuilder, RecordBatch, StringBuilder};

const COPIES: usize = 10;
const BATCH_ROWS: usize = 8192;

fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(path)
}

/// The real rows' turns, replicated, as record batches of list<utf8> columns.
fn batches() -> Vec<RecordBatch> {
    let mut reader = csv::Reader::from_path(shared("data/lmsys-arena/train_sample.csv"))
        .expect("the real sample");
    let headers = reader.headers().expect("header").clone();
    let column = |name: &str| headers.iter().position(|h| h == name).expect("column");
    let (p, a, b) = (column("prompt"), column("response_a"), column("response_b"));
    let turns =
        |field: &str| -> Vec<Option<String>> { serde_json::from_str(field).unwrap_or_default() };
    let rows: Vec<[Vec<Option<String>>; 3]> = reader
        .records()
        .map(|r| {
            let r = r.expect("record");
            [turns(&r[p]), turns(&r[a]), turns(&r[b])]
        })
        .collect();
    let all: Vec<&[Vec<Option<String>>; 3]> =
        rows.iter().cycle().take(rows.len() * COPIES).collect();
    all.chunks(BATCH_ROWS)
        .map(|chunk| {
            let columns: Vec<Arc<dyn Array>> = (0..3)
                .map(|c| {
                    let mut list = ListBuilder::new(StringBuilder::new());
                    for row in chunk {
                        for turn in &row[c] {
                            list.values().append_option(turn.as_deref());
                        }
                        list.append(true);
                    }
                    Arc::new(list.finish()) as Arc<dyn Array>
                })
                .collect();
            RecordBatch::try_from_iter(vec![
                ("prompt", columns[0].clone()),
                ("response_a", columns[1].clone()),
                ("response_b", columns[2].clone()),
            ])
            .expect("batch")
        })
        .collect()
}

fn tokenize(c: &mut Criterion) {
    let batches = batches();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut group = c.benchmark_group("tokenize");
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    for family in ["llama3", "gemma2"] {
        let tokenizer = Arc::new(
            TextTokenizer::open(&shared(&format!("tokenizers/{family}/tokenizer.json")))
                .expect("tokenizer"),
        );
        let encoder = Encoder::new(
            tokenizer,
            Template::open("blackpearl").expect("template"),
            1024,
            Truncation::Balanced,
            Order::Ab,
            256,
        )
        .expect("encoder");
        let schema = output_schema(&batches[0].schema()).expect("schema");
        group.bench_function(format!("blackpearl_1024_{family}_{rows}"), |b| {
            b.iter(|| {
                let mut tokens = 0usize;
                for batch in &batches {
                    let out = tokenize_batch(&encoder, batch, &schema).expect("tokenize");
                    tokens += out.column(4).len();
                }
                tokens
            })
        });
    }
    group.finish();
}

criterion_group!(benches, tokenize);
criterion_main!(benches);
