//! Kaggle-format CSV: `train.csv`, `test.csv` and the UltraFeedback conversion.
//!
//! `id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie`;
//! the text columns are JSON-encoded lists of turns. `test.csv` has no model or winner
//! columns; its rows get a null label.

use std::collections::HashMap;

use arenaflow_udfs::{one_hot_label, parse_turns};
use csv::ByteRecord;

use super::canonical::{Comparison, Turns};
use super::{in_parallel, OnError, Parsed};
use crate::error::SourceError;

const TEXT_COLUMNS: [&str; 3] = ["prompt", "response_a", "response_b"];
const WINNER_COLUMNS: [&str; 3] = ["winner_model_a", "winner_model_b", "winner_tie"];

struct Columns {
    id: usize,
    text: [usize; 3],
    models: Option<[usize; 2]>,
    winners: Option<[usize; 3]>,
}

fn find_columns(file: &str, header: &ByteRecord) -> Result<Columns, SourceError> {
    let names: Vec<String> = header
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let raw = if i == 0 {
                raw.strip_prefix(b"\xef\xbb\xbf").unwrap_or(raw)
            } else {
                raw
            };
            String::from_utf8_lossy(raw).trim().to_string()
        })
        .collect();
    let position = |name: &str| names.iter().position(|n| n == name);
    let require = |name: &str| {
        position(name).ok_or_else(|| SourceError {
            file: file.to_string(),
            record: None,
            id: None,
            column: Some(name.to_string()),
            message: format!("missing column (the header has: {})", names.join(",")),
        })
    };
    let optional_group = |group: &[&str]| -> Result<Option<Vec<usize>>, SourceError> {
        let found: Vec<Option<usize>> = group.iter().map(|n| position(n)).collect();
        if found.iter().all(Option::is_none) {
            return Ok(None);
        }
        group
            .iter()
            .map(|n| require(n))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    Ok(Columns {
        id: require("id")?,
        text: [
            require(TEXT_COLUMNS[0])?,
            require(TEXT_COLUMNS[1])?,
            require(TEXT_COLUMNS[2])?,
        ],
        models: optional_group(&["model_a", "model_b"])?.map(|v| [v[0], v[1]]),
        winners: optional_group(&WINNER_COLUMNS)?.map(|v| [v[0], v[1], v[2]]),
    })
}

fn utf8_field<'r>(
    file: &str,
    record_no: usize,
    id: Option<&str>,
    record: &'r ByteRecord,
    index: usize,
    column: &str,
) -> Result<&'r str, SourceError> {
    let raw = record.get(index).unwrap_or_default();
    std::str::from_utf8(raw).map_err(|e| {
        SourceError::row(
            file,
            record_no,
            id,
            Some(column),
            format!("invalid UTF-8 at byte {} of the field", e.valid_up_to()),
        )
    })
}

fn parse_record(
    file: &str,
    record_no: usize,
    record: &ByteRecord,
    columns: &Columns,
) -> Result<Comparison, SourceError> {
    let id = utf8_field(file, record_no, None, record, columns.id, "id")?.trim();
    if id.is_empty() {
        return Err(SourceError::row(
            file,
            record_no,
            None,
            Some("id"),
            "empty id",
        ));
    }
    let err = |column: &str, message: String| {
        SourceError::row(file, record_no, Some(id), Some(column), message)
    };
    let field =
        |index: usize, column: &str| utf8_field(file, record_no, Some(id), record, index, column);
    let turns = |i: usize| -> Result<Turns, SourceError> {
        parse_turns(field(columns.text[i], TEXT_COLUMNS[i])?)
            .map_err(|e| err(TEXT_COLUMNS[i], e.to_string()))
    };
    let [prompt, response_a, response_b] = [turns(0)?, turns(1)?, turns(2)?];
    let (model_a, model_b) = match columns.models {
        Some([a, b]) => (
            Some(field(a, "model_a")?.to_string()),
            Some(field(b, "model_b")?.to_string()),
        ),
        None => (None, None),
    };
    let label = match columns.winners {
        None => None,
        Some(indices) => {
            let mut flags = [0i64; 3];
            for (flag, (index, column)) in flags.iter_mut().zip(indices.iter().zip(WINNER_COLUMNS))
            {
                *flag = match field(*index, column)?.trim() {
                    "0" => 0,
                    "1" => 1,
                    other => return Err(err(column, format!("expected 0 or 1, got {other:?}"))),
                };
            }
            Some(
                one_hot_label(flags[0], flags[1], flags[2])
                    .map_err(|m| err("winner_model_a,winner_model_b,winner_tie", m))?,
            )
        }
    };
    Ok(Comparison {
        id: id.to_string(),
        prompt,
        response_a,
        response_b,
        model_a,
        model_b,
        label,
    })
}

/// Parses a whole Kaggle-format CSV; rows are converted on all cores.
/// A CSV error with the line and byte where its record starts. The csv crate reports the
/// position of a record that follows a CRLF at that CRLF's `\n` (one line and one byte
/// early, on files as the Kaggle data ships); this moves it past the terminator.
fn csv_error(bytes: &[u8], e: &csv::Error) -> String {
    let csv::ErrorKind::UnequalLengths {
        pos: Some(pos),
        expected_len,
        len,
    } = e.kind()
    else {
        return e.to_string();
    };
    let (mut line, mut byte) = (pos.line(), pos.byte() as usize);
    if bytes.get(byte) == Some(&b'\n') {
        line += 1;
        byte += 1;
    }
    format!(
        "record {} (line {line}, byte {byte}): found record with {len} fields, but the previous record has {expected_len} fields",
        pos.record()
    )
}

pub fn parse(file: &str, bytes: &[u8], on_error: OnError) -> Result<Parsed, SourceError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(SourceError::file(
            file,
            "the file is empty: expected a header with id,prompt,response_a,response_b",
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes);
    let header = reader
        .byte_headers()
        .map_err(|e| SourceError::file(file, format!("unreadable CSV header: {e}")))?
        .clone();
    let columns = find_columns(file, &header)?;
    let mut parsed = Parsed::default();
    let mut records = Vec::new();
    for (i, record) in reader.byte_records().enumerate() {
        match record {
            Ok(record) => records.push((i + 1, record)),
            Err(e) => {
                let error = SourceError::row(
                    file,
                    i + 1,
                    None,
                    None,
                    format!("malformed CSV: {}", csv_error(bytes, &e)),
                );
                match (on_error, e.kind()) {
                    (OnError::Skip, csv::ErrorKind::UnequalLengths { .. }) => {
                        parsed.skipped.push(error)
                    }
                    _ => return Err(error),
                }
            }
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(records.len());
    let results = in_parallel(records, |part| {
        part.into_iter()
            .map(|(record_no, record)| {
                (record_no, parse_record(file, record_no, &record, &columns))
            })
            .collect::<Vec<_>>()
    });
    for (record_no, result) in results.into_iter().flatten() {
        let row = result.and_then(|row| match seen.insert(row.id.clone(), record_no) {
            Some(first) => Err(SourceError::row(
                file,
                record_no,
                Some(&row.id),
                Some("id"),
                format!("duplicate id: row {first} has it too"),
            )),
            None => Ok(row),
        });
        parsed.accept(row, on_error)?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_the_same_with_crlf_and_lf() {
        let row = "1,a,b,\"[\"\"p\"\"]\",\"[\"\"x\"\"]\",\"[\"\"y\"\"]\",1,0,0";
        let lf = format!("{HEADER}{row}\n2,a,b\n");
        let crlf = lf.replace('\n', "\r\n");
        let at = |csv: &str| {
            parse("t.csv", csv.as_bytes(), OnError::Fail)
                .unwrap_err()
                .to_string()
        };
        let line_of_bad_row = 3;
        let lf_byte = HEADER.len() + row.len() + 1;
        assert!(
            at(&lf).contains(&format!("(line {line_of_bad_row}, byte {lf_byte})")),
            "{}",
            at(&lf)
        );
        assert!(
            at(&crlf).contains(&format!("(line {line_of_bad_row}, byte {})", lf_byte + 2)),
            "{}",
            at(&crlf)
        );
    }

    const HEADER: &str = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";

    #[test]
    fn reads_a_row_and_its_label() {
        let csv = format!(
            "{HEADER}7,m1,m2,\"[\"\"hi\"\", null]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,1,0\n"
        );
        let parsed = parse("t.csv", csv.as_bytes(), OnError::Fail).unwrap();
        let row = &parsed.rows[0];
        assert_eq!(row.id, "7");
        assert_eq!(row.prompt, vec![Some("hi".to_string()), None]);
        assert_eq!(row.label, Some(1));
        assert_eq!(row.model_b.as_deref(), Some("m2"));
    }

    #[test]
    fn the_string_zero_is_not_true() {
        let csv = format!("{HEADER}7,m1,m2,\"[]\",\"[]\",\"[]\",\"0\",\"0\",\"0\"\n");
        let err = parse("t.csv", csv.as_bytes(), OnError::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.csv: row 1 (id 7), column winner_model_a,winner_model_b,winner_tie"),
            "{err}"
        );
    }

    #[test]
    fn skip_policy_counts_bad_rows() {
        let csv =
            format!("{HEADER}1,m,m,\"[\",\"[]\",\"[]\",1,0,0\n2,m,m,\"[]\",\"[]\",\"[]\",1,0,0\n");
        let parsed = parse("t.csv", csv.as_bytes(), OnError::Skip).unwrap();
        assert_eq!((parsed.rows.len(), parsed.skipped.len()), (1, 1));
        assert_eq!(parsed.skipped[0].column.as_deref(), Some("prompt"));
    }
}
