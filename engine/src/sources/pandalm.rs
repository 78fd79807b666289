//! PandaLM test set: a JSON array of `{idx, cmp_key, instruction, input, response1,
//! response2, annotator1..3}`; annotators say 0 = tie, 1 = response1, 2 = response2 and
//! the label is their majority.

use serde::Deserialize;
use serde_json::Value;

use super::canonical::Comparison;
use super::{file_text, OnError, Parsed};
use crate::error::SourceError;
use arenaflow_udfs::{LABEL_A, LABEL_B, LABEL_TIE};

#[derive(Deserialize)]
struct PandaLmRow {
    idx: i64,
    #[serde(default)]
    cmp_key: Option<String>,
    instruction: String,
    #[serde(default)]
    input: Option<String>,
    response1: Value,
    response2: Value,
    annotator1: i64,
    annotator2: i64,
    annotator3: i64,
}

fn majority(votes: [i64; 3]) -> Option<i64> {
    votes
        .iter()
        .copied()
        .find(|v| votes.iter().filter(|w| *w == v).count() >= 2)
}

/// A response as text. The real file has a response stored as the JSON boolean `true`
/// (idx 157, a model that answered "True"): scalars keep their JSON text, null is a null turn.
fn response_text(
    file: &str,
    record_no: usize,
    id: &str,
    column: &str,
    value: Value,
) -> Result<Option<String>, SourceError> {
    match value {
        Value::String(s) => Ok(Some(s)),
        Value::Null => Ok(None),
        Value::Bool(_) | Value::Number(_) => Ok(Some(value.to_string())),
        _ => Err(SourceError::row(
            file,
            record_no,
            Some(id),
            Some(column),
            "expected a string",
        )),
    }
}

fn convert(file: &str, record_no: usize, row: PandaLmRow) -> Result<Comparison, SourceError> {
    let id = format!("pandalm:{}", row.idx);
    let response_a = response_text(file, record_no, &id, "response1", row.response1)?;
    let response_b = response_text(file, record_no, &id, "response2", row.response2)?;
    let votes = [row.annotator1, row.annotator2, row.annotator3];
    let label = match majority(votes) {
        Some(0) => LABEL_TIE,
        Some(1) => LABEL_A,
        Some(2) => LABEL_B,
        other => {
            let why = match other {
                Some(v) => format!("annotator value {v} is not 0 (tie), 1 or 2"),
                None => format!("no majority among the annotators: {votes:?}"),
            };
            return Err(SourceError::row(
                file,
                record_no,
                Some(&id),
                Some("annotator1,annotator2,annotator3"),
                why,
            ));
        }
    };
    let prompt = match row.input.as_deref().map(str::trim) {
        Some(input) if !input.is_empty() => format!("{}\n\n{}", row.instruction, input),
        _ => row.instruction,
    };
    let (model_a, model_b) = match row
        .cmp_key
        .as_deref()
        .map(|k| k.split('_').collect::<Vec<_>>())
    {
        Some(parts) if parts.len() == 2 => (Some(parts[0].to_string()), Some(parts[1].to_string())),
        _ => (None, None),
    };
    Ok(Comparison {
        id,
        prompt: vec![Some(prompt)],
        response_a: vec![response_a],
        response_b: vec![response_b],
        model_a,
        model_b,
        label: Some(label),
    })
}

pub fn parse(file: &str, bytes: &[u8], on_error: OnError) -> Result<Parsed, SourceError> {
    let text = file_text(file, bytes, "a JSON array of PandaLM rows")?;
    let rows: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| SourceError::file(file, format!("not a JSON array: {e}")))?;
    let mut parsed = Parsed::default();
    for (i, value) in rows.into_iter().enumerate() {
        let id = value.get("idx").map(|v| format!("pandalm:{v}"));
        let row = serde_json::from_value::<PandaLmRow>(value)
            .map_err(|e| SourceError::row(file, i + 1, id.as_deref(), None, e.to_string()))
            .and_then(|row| convert(file, i + 1, row));
        parsed.accept(row, on_error)?;
    }
    Ok(parsed)
}
