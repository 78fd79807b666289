//! The Kaggle text columns: a JSON-encoded list of turns (`["q1", null, "q2"]`).
//!
//! Hand-written rather than serde_json because the real data holds lone UTF-16 surrogate
//! escapes (`"\ud83d"`), which serde_json rejects and Python's `json.loads` accepts; a lone
//! surrogate becomes U+FFFD here.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// Why a turns list did not parse, with the byte offset into the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnsError {
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for TurnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed JSON list of turns at byte {}: {}",
            self.offset, self.reason
        )
    }
}

impl std::error::Error for TurnsError {}

/// Parses `[ "text" | null , ... ]` into turns; `null` turns stay `None`.
pub fn parse_turns(text: &str) -> Result<Vec<Option<String>>, TurnsError> {
    let mut parser = TurnsParser {
        bytes: text.as_bytes(),
        text,
        pos: 0,
    };
    parser.list()
}

struct TurnsParser<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl TurnsParser<'_> {
    fn fail<T>(&self, reason: &'static str) -> Result<T, TurnsError> {
        Err(TurnsError {
            offset: self.pos,
            reason,
        })
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn list(&mut self) -> Result<Vec<Option<String>>, TurnsError> {
        self.skip_ws();
        if self.bytes.get(self.pos) != Some(&b'[') {
            return self.fail("expected '[' opening the list of turns");
        }
        self.pos += 1;
        let mut turns = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                turns.push(self.turn()?);
                self.skip_ws();
                match self.bytes.get(self.pos) {
                    Some(b',') => self.pos += 1,
                    Some(b']') => {
                        self.pos += 1;
                        break;
                    }
                    None => return self.fail("list of turns is not closed with ']'"),
                    Some(_) => return self.fail("expected ',' or ']' after a turn"),
                }
            }
        }
        self.skip_ws();
        if self.pos != self.bytes.len() {
            return self.fail("unexpected text after the closing ']'");
        }
        Ok(turns)
    }

    fn turn(&mut self) -> Result<Option<String>, TurnsError> {
        match self.bytes.get(self.pos) {
            Some(b'"') => self.string().map(Some),
            Some(b'n') if self.bytes[self.pos..].starts_with(b"null") => {
                self.pos += 4;
                Ok(None)
            }
            None => self.fail("list of turns ends inside a turn"),
            Some(_) => self.fail("a turn must be a JSON string or null"),
        }
    }

    fn string(&mut self) -> Result<String, TurnsError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            // Jump to the next quote or backslash; the run before it is copied whole.
            let rest = &self.bytes[self.pos..];
            let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                return self.fail("unterminated string");
            };
            let run = &rest[..at];
            if let Some(control) = run.iter().position(|&b| b < 0x20) {
                self.pos += control;
                return self.fail("raw control character inside a string");
            }
            out.push_str(&self.text[self.pos..self.pos + at]);
            self.pos += at;
            if rest[at] == b'"' {
                self.pos += 1;
                return Ok(out);
            }
            self.escape(&mut out)?;
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), TurnsError> {
        let Some(&kind) = self.bytes.get(self.pos + 1) else {
            return self.fail("unterminated escape");
        };
        self.pos += 2;
        let c = match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        // A high surrogate pairs with an immediately following low one.
                        let low = if self.bytes[self.pos..].starts_with(b"\\u") {
                            let save = self.pos;
                            self.pos += 2;
                            let low = self.hex4()?;
                            if (0xDC00..=0xDFFF).contains(&low) {
                                Some(low)
                            } else {
                                self.pos = save;
                                None
                            }
                        } else {
                            None
                        };
                        match low {
                            Some(low) => {
                                let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                                char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
                            }
                            None => char::REPLACEMENT_CHARACTER,
                        }
                    }
                    0xDC00..=0xDFFF => char::REPLACEMENT_CHARACTER,
                    _ => char::from_u32(unit).unwrap_or(char::REPLACEMENT_CHARACTER),
                }
            }
            _ => {
                self.pos -= 1;
                return self.fail("invalid escape sequence");
            }
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, TurnsError> {
        let Some(digits) = self.bytes.get(self.pos..self.pos + 4) else {
            return self.fail("truncated \\u escape");
        };
        let mut value = 0u32;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return self.fail("invalid hex digit in \\u escape"),
            };
            value = value * 16 + u32::from(v);
        }
        self.pos += 4;
        Ok(value)
    }
}

/// Appends turns to a `list<utf8>` builder.
pub fn append_turns(builder: &mut ListBuilder<StringBuilder>, turns: &[Option<String>]) {
    for turn in turns {
        builder.values().append_option(turn.as_deref());
    }
    builder.append(true);
}

/// `arena_turns(text)`: a Kaggle JSON-encoded turns column as `list<utf8>`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ArenaTurns {
    signature: Signature,
}

impl Default for ArenaTurns {
    fn default() -> Self {
        Self {
            signature: Signature::string(1, Volatility::Immutable),
        }
    }
}

pub fn turns_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)))
}

impl ScalarUDFImpl for ArenaTurns {
    fn name(&self) -> &str {
        "arena_turns"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View] => Ok(turns_type()),
            other => plan_err!("arena_turns takes one string argument, got {other:?}"),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        let array = datafusion::arrow::compute::cast(&array, &DataType::Utf8)?;
        let strings = array.as_string::<i32>();
        let mut builder = ListBuilder::new(StringBuilder::new());
        for row in 0..strings.len() {
            if strings.is_null(row) {
                builder.append_null();
                continue;
            }
            let value = strings.value(row);
            match parse_turns(value) {
                Ok(turns) => append_turns(&mut builder, &turns),
                Err(e) => {
                    let head: String = value.chars().take(40).collect();
                    return exec_err!(
                        "arena_turns: row {row} of the batch: {e} (value starts {head:?})"
                    );
                }
            }
        }
        Ok(ColumnarValue::Array(Arc::new(builder.finish()) as ArrayRef))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<Option<String>> {
        parse_turns(s).unwrap()
    }

    #[test]
    fn parses_turns_nulls_and_escapes() {
        assert_eq!(
            ok(r#"["a", null ,"b\n\"c\""]"#),
            vec![Some("a".into()), None, Some("b\n\"c\"".into())]
        );
        assert_eq!(ok("[]"), Vec::<Option<String>>::new());
        assert_eq!(
            ok(r#" ["caf\u00e9 \/ \ud83d\ude00"] "#),
            vec![Some("café / 😀".into())]
        );
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        assert_eq!(ok(r#"["x\ud83dy"]"#), vec![Some("x\u{fffd}y".into())]);
        assert_eq!(ok(r#"["\ude00"]"#), vec![Some("\u{fffd}".into())]);
        assert_eq!(ok(r#"["\ud83d\u0041"]"#), vec![Some("\u{fffd}A".into())]);
    }

    #[test]
    fn malformed_lists_are_errors_with_offsets() {
        for (text, offset) in [
            (r#"["a""#, 4),
            (r#"["a" "b"]"#, 5),
            (r#"{"a": 1}"#, 0),
            (r#"["a"] x"#, 6),
            (r#"[1]"#, 1),
            (r#"["\x"]"#, 3),
            ("", 0),
            ("[\"ab\u{1}\"]", 4),
        ] {
            let err = parse_turns(text).unwrap_err();
            assert_eq!(err.offset, offset, "{text}: {err}");
        }
    }
}
