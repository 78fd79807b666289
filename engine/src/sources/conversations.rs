//! `lmsys/chatbot_arena_conversations`: `question_id, model_a, model_b, winner,
//! conversation_a, conversation_b, ...` where a conversation is a list of
//! `{role, content}`; read from Parquet (as published), a JSON array or JSON lines.
//! `winner` is model_a / model_b / tie / "tie (bothbad)"; both ties become tie.

use bytes::Bytes;
use datafusion::arrow::json::ArrayWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use super::canonical::{Comparison, Turns};
use super::{file_text, OnError, Parsed};
use crate::error::SourceError;
use arenaflow_udfs::{LABEL_A, LABEL_B, LABEL_TIE};

fn rows_from_parquet(file: &str, bytes: Bytes) -> Result<Vec<Value>, SourceError> {
    let bad =
        |e: &dyn std::fmt::Display| SourceError::file(file, format!("unreadable Parquet: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| bad(&e))?
        .build()
        .map_err(|e| bad(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let mut writer = ArrayWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| bad(&e))?;
        writer.finish().map_err(|e| bad(&e))?;
        let json = writer.into_inner();
        if !json.is_empty() {
            let values: Vec<Value> = serde_json::from_slice(&json).map_err(|e| bad(&e))?;
            rows.extend(values);
        }
    }
    Ok(rows)
}

fn rows_from_json(file: &str, bytes: &[u8]) -> Result<Vec<Value>, SourceError> {
    let text = file_text(file, bytes, "chatbot_arena_conversations rows")?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(text)
            .map_err(|e| SourceError::file(file, format!("not a JSON array: {e}")));
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                SourceError::row(file, i + 1, None, None, format!("not a JSON object: {e}"))
            })
        })
        .collect()
}

fn convert(file: &str, record_no: usize, row: &Value) -> Result<Comparison, SourceError> {
    let text = |key: &str| row.get(key).and_then(Value::as_str);
    let Some(id) = text("question_id").map(str::to_string) else {
        return Err(SourceError::row(
            file,
            record_no,
            None,
            Some("question_id"),
            "missing or not a string",
        ));
    };
    let err = |column: &str, message: String| {
        SourceError::row(file, record_no, Some(&id), Some(column), message)
    };
    let turns = |column: &str, role: &str| -> Result<Turns, SourceError> {
        let Some(conversation) = row.get(column).and_then(Value::as_array) else {
            return Err(err(
                column,
                "missing or not a list of {role, content}".into(),
            ));
        };
        conversation
            .iter()
            .filter(|turn| turn.get("role").and_then(Value::as_str) == Some(role))
            .map(|turn| match turn.get("content") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Null) => Ok(None),
                _ => Err(err(column, format!("a {role} turn has no string content"))),
            })
            .collect()
    };
    let prompt = turns("conversation_a", "user")?;
    if prompt != turns("conversation_b", "user")? {
        return Err(err(
            "conversation_b",
            "the user turns differ from conversation_a's".into(),
        ));
    }
    let label = match text("winner") {
        Some("model_a") => LABEL_A,
        Some("model_b") => LABEL_B,
        Some("tie" | "tie (bothbad)") => LABEL_TIE,
        other => {
            return Err(err(
                "winner",
                format!("expected model_a, model_b, tie or \"tie (bothbad)\", got {other:?}"),
            ))
        }
    };
    Ok(Comparison {
        prompt,
        response_a: turns("conversation_a", "assistant")?,
        response_b: turns("conversation_b", "assistant")?,
        model_a: text("model_a").map(str::to_string),
        model_b: text("model_b").map(str::to_string),
        label: Some(label),
        id,
    })
}

pub fn parse(file: &str, bytes: Bytes, on_error: OnError) -> Result<Parsed, SourceError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(SourceError::file(
            file,
            "the file is empty: expected chatbot_arena_conversations rows",
        ));
    }
    let rows = if bytes.starts_with(b"PAR1") {
        rows_from_parquet(file, bytes)?
    } else {
        rows_from_json(file, &bytes)?
    };
    let mut parsed = Parsed::default();
    for (i, row) in rows.iter().enumerate() {
        parsed.accept(convert(file, i + 1, row), on_error)?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ties_become_tie_and_turns_split_by_role() {
        let jsonl = r#"{"question_id":"q1","model_a":"x","model_b":"y","winner":"tie (bothbad)","conversation_a":[{"role":"user","content":"hi"},{"role":"assistant","content":"A"}],"conversation_b":[{"role":"user","content":"hi"},{"role":"assistant","content":"B"}]}"#;
        let parsed = parse("c.jsonl", Bytes::from(jsonl), OnError::Fail).unwrap();
        let row = &parsed.rows[0];
        assert_eq!(
            (row.label, row.prompt.clone()),
            (Some(LABEL_TIE), vec![Some("hi".to_string())])
        );
        assert_eq!(row.response_b, vec![Some("B".to_string())]);
    }

    #[test]
    fn unknown_winner_names_the_column() {
        let jsonl =
            r#"{"question_id":"q9","winner":"model_c","conversation_a":[],"conversation_b":[]}"#;
        let err = parse("c.jsonl", Bytes::from(jsonl), OnError::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.jsonl: row 1 (id q9), column winner"),
            "{err}"
        );
    }
}
