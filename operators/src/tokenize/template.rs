//! Text templates: how the prompt and the two responses become one model input. A template
//! is a plain text file (settings, a `---` line, then the text with `{prompt}`,
//! `{response_a}` and `{response_b}` slots), so users can add their own; `blackpearl` and
//! `emiz` are built in.

use std::path::{Path, PathBuf};

use crate::error::{OperatorError, Result};

/// One of the three texts a template places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Prompt,
    ResponseA,
    ResponseB,
}

impl Slot {
    /// Position in (prompt, response A, response B) triples.
    pub fn index(self) -> usize {
        match self {
            Self::Prompt => 0,
            Self::ResponseA => 1,
            Self::ResponseB => 2,
        }
    }

    pub fn placeholder(self) -> &'static str {
        match self {
            Self::Prompt => "{prompt}",
            Self::ResponseA => "{response_a}",
            Self::ResponseB => "{response_b}",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Slot(Slot),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub pieces: Vec<Piece>,
    /// Joins the turns of a multi-turn conversation.
    pub turn_separator: String,
    /// What an EOS string inside a prompt or response becomes (so that text cannot end the
    /// sequence early).
    pub replace_eos_with: String,
    /// Whether the EOS token ends every input.
    pub append_eos: bool,
}

const BUILT_IN: [(&str, &str); 2] = [
    (
        "blackpearl",
        include_str!("../../../plans/templates/blackpearl.txt"),
    ),
    ("emiz", include_str!("../../../plans/templates/emiz.txt")),
];

impl Template {
    /// A built-in template by name, or a template file by path.
    pub fn open(name_or_path: &str) -> Result<Self> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(name, text, Path::new(name));
        }
        let path = PathBuf::from(name_or_path);
        if !path.is_file() {
            return Err(OperatorError::Template {
                path,
                message: format!(
                    "no such file, and not a built-in template ({})",
                    BUILT_IN.map(|(n, _)| n).join(", ")
                ),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| OperatorError::io(&path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        Self::parse(&name, &text, &path)
    }

    pub fn parse(name: &str, text: &str, path: &Path) -> Result<Self> {
        let err = |message: String| OperatorError::Template {
            path: path.to_path_buf(),
            message,
        };
        let (header, body) = match text.split_once("\n---\n") {
            Some((h, b)) => (h, b),
            None => match text.strip_prefix("---\n") {
                Some(b) => ("", b),
                None => return Err(err("no `---` line between the settings and the text".into())),
            },
        };
        let body = body.strip_suffix('\n').unwrap_or(body);
        let mut turn_separator = None;
        let mut replace_eos_with = None;
        let mut append_eos = None;
        for (i, line) in header.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err(format!("line {}: expected `name = value`", i + 1)))?;
            let value: serde_json::Value = serde_json::from_str(value.trim())
                .map_err(|e| err(format!("line {}: the value is not JSON: {e}", i + 1)))?;
            let as_string = |v: &serde_json::Value| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("line {}: `{}` takes a string", i + 1, key.trim())))
            };
            match key.trim() {
                "turn_separator" => turn_separator = Some(as_string(&value)?),
                "replace_eos_with" => replace_eos_with = Some(as_string(&value)?),
                "append_eos" => {
                    append_eos = Some(value.as_bool().ok_or_else(|| {
                        err(format!("line {}: `append_eos` takes true or false", i + 1))
                    })?)
                }
                other => {
                    return Err(err(format!(
                        "line {}: unknown setting `{other}` (turn_separator, replace_eos_with, append_eos)",
                        i + 1
                    )))
                }
            }
        }
        let pieces = split_slots(body).map_err(err)?;
        Ok(Self {
            name: name.to_string(),
            pieces,
            turn_separator: turn_separator
                .ok_or_else(|| err("missing setting `turn_separator`".into()))?,
            replace_eos_with: replace_eos_with.unwrap_or_default(),
            append_eos: append_eos.ok_or_else(|| err("missing setting `append_eos`".into()))?,
        })
    }

    /// The slots in the order the text places them.
    pub fn slot_order(&self) -> Vec<Slot> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Slot(s) => Some(*s),
                Piece::Text(_) => None,
            })
            .collect()
    }
}

fn split_slots(body: &str) -> std::result::Result<Vec<Piece>, String> {
    let slots = [Slot::Prompt, Slot::ResponseA, Slot::ResponseB];
    let mut pieces = Vec::new();
    let mut rest = body;
    let mut seen = Vec::new();
    loop {
        let next = slots
            .iter()
            .filter_map(|s| rest.find(s.placeholder()).map(|at| (at, *s)))
            .min_by_key(|(at, _)| *at);
        let Some((at, slot)) = next else {
            if !rest.is_empty() {
                pieces.push(Piece::Text(rest.to_string()));
            }
            break;
        };
        if at > 0 {
            pieces.push(Piece::Text(rest[..at].to_string()));
        }
        if seen.contains(&slot) {
            return Err(format!("{} occurs twice", slot.placeholder()));
        }
        seen.push(slot);
        pieces.push(Piece::Slot(slot));
        rest = &rest[at + slot.placeholder().len()..];
    }
    for slot in slots {
        if !seen.contains(&slot) {
            return Err(format!("the text has no {}", slot.placeholder()));
        }
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_templates_are_the_published_ones() {
        let bp = Template::open("blackpearl").unwrap();
        assert_eq!(bp.turn_separator, "\n");
        assert!(bp.append_eos);
        assert_eq!(
            bp.pieces,
            vec![
                Piece::Text("User question:\n\"\"\"".into()),
                Piece::Slot(Slot::Prompt),
                Piece::Text("\"\"\"\nAnswer A:\n\"\"\"".into()),
                Piece::Slot(Slot::ResponseA),
                Piece::Text("\"\"\"\nAnswer B:\n\"\"\"".into()),
                Piece::Slot(Slot::ResponseB),
                Piece::Text("\"\"\"\n".into()),
            ]
        );
        let emiz = Template::open("emiz").unwrap();
        assert_eq!(emiz.turn_separator, " ");
        assert_eq!(
            emiz.pieces,
            vec![
                Piece::Text("<prompt>: ".into()),
                Piece::Slot(Slot::Prompt),
                Piece::Text("\n\n<response_a>: ".into()),
                Piece::Slot(Slot::ResponseA),
                Piece::Text("\n\n<response_b>: ".into()),
                Piece::Slot(Slot::ResponseB),
            ]
        );
    }

    #[test]
    fn bad_templates_say_why() {
        let p = Path::new("t.txt");
        let e = Template::parse(
            "t",
            "turn_separator = \" \"\nappend_eos = true\n---\n{prompt} {response_a}\n",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no {response_b}"), "{e}");
        let e = Template::parse("t", "colour = \"red\"\n---\nx\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown setting `colour`"), "{e}");
        let e = Template::parse("t", "no separator line", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("---"), "{e}");
    }
}
