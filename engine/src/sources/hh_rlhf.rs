//! Anthropic HH-RLHF: JSON lines (optionally gzip) of `{"chosen", "rejected"}` dialogues.
//!
//! The turns both dialogues share become the prompt (one element per turn, with its
//! speaker when there is more than one turn); what follows becomes the two responses.
//! Chosen and rejected land on A and B in a seeded random order; `model_a` and `model_b`
//! record it ("chosen" / "rejected").

use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::canonical::Comparison;
use super::{file_text, OnError, Parsed};
use crate::error::SourceError;
use arenaflow_udfs::{LABEL_A, LABEL_B};

#[derive(Deserialize)]
struct Pair {
    chosen: String,
    rejected: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Speaker {
    Human,
    Assistant,
}

/// Splits `\n\nHuman: ...\n\nAssistant: ...` into turns.
fn dialogue_turns(text: &str) -> Vec<(Speaker, &str)> {
    const MARKERS: [(&str, Speaker); 2] = [
        ("\n\nHuman:", Speaker::Human),
        ("\n\nAssistant:", Speaker::Assistant),
    ];
    let mut starts: Vec<(usize, usize, Speaker)> = MARKERS
        .iter()
        .flat_map(|(marker, speaker)| {
            text.match_indices(marker)
                .map(move |(at, m)| (at, at + m.len(), *speaker))
        })
        .collect();
    starts.sort_unstable();
    let mut turns = Vec::with_capacity(starts.len());
    if let Some(&(first, _, _)) = starts.first() {
        if !text[..first].trim().is_empty() {
            turns.push((Speaker::Human, text[..first].trim()));
        }
    }
    for (i, &(_, body_start, speaker)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |next| next.0);
        turns.push((speaker, text[body_start..end].trim()));
    }
    turns
}

fn render(turns: &[(Speaker, &str)], with_speakers: bool) -> Vec<Option<String>> {
    turns
        .iter()
        .map(|(speaker, body)| match (with_speakers, speaker) {
            (false, _) => Some(body.to_string()),
            (true, Speaker::Human) => Some(format!("Human: {body}")),
            (true, Speaker::Assistant) => Some(format!("Assistant: {body}")),
        })
        .collect()
}

fn convert(
    file: &str,
    stem: &str,
    line_no: usize,
    pair: &Pair,
    seed: u64,
) -> Result<Comparison, SourceError> {
    let id = format!("{stem}:{line_no}");
    let chosen = dialogue_turns(&pair.chosen);
    let rejected = dialogue_turns(&pair.rejected);
    let shared = chosen
        .iter()
        .zip(&rejected)
        .take_while(|(c, r)| c == r)
        .count();
    if shared == 0 {
        return Err(SourceError::row(
            file,
            line_no,
            Some(&id),
            Some("chosen"),
            "chosen and rejected share no opening turn",
        ));
    }
    if shared == chosen.len() || shared == rejected.len() {
        return Err(SourceError::row(
            file,
            line_no,
            Some(&id),
            Some("rejected"),
            "one dialogue is a prefix of the other: nothing to compare",
        ));
    }
    let response = |turns: &[(Speaker, &str)]| -> Vec<Option<String>> {
        let rest = &turns[shared..];
        if rest.len() == 1 {
            render(rest, false)
        } else {
            vec![Some(
                render(rest, true)
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            )]
        }
    };
    let prompt = render(&chosen[..shared], shared > 1);
    let chosen_is_a = xxh3_64_with_seed(id.as_bytes(), seed) & 1 == 0;
    let (a, b, label, names) = if chosen_is_a {
        (
            response(&chosen),
            response(&rejected),
            LABEL_A,
            ("chosen", "rejected"),
        )
    } else {
        (
            response(&rejected),
            response(&chosen),
            LABEL_B,
            ("rejected", "chosen"),
        )
    };
    Ok(Comparison {
        id,
        prompt,
        response_a: a,
        response_b: b,
        model_a: Some(names.0.to_string()),
        model_b: Some(names.1.to_string()),
        label: Some(label),
    })
}

pub fn parse(
    file: &str,
    bytes: &[u8],
    seed: u64,
    on_error: OnError,
) -> Result<Parsed, SourceError> {
    let text = file_text(file, bytes, "JSON lines of {\"chosen\", \"rejected\"}")?;
    let name = file.rsplit('/').next().unwrap_or(file);
    let stem = name.split('.').next().unwrap_or(name);
    let mut parsed = Parsed::default();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row = serde_json::from_str::<Pair>(line)
            .map_err(|e| {
                SourceError::row(
                    file,
                    i + 1,
                    None,
                    None,
                    format!("not a {{\"chosen\", \"rejected\"}} object: {e}"),
                )
            })
            .and_then(|pair| convert(file, stem, i + 1, &pair, seed));
        parsed.accept(row, on_error)?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_turns_become_the_prompt() {
        let pair = Pair {
            chosen: "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: good".into(),
            rejected: "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: bad".into(),
        };
        let row = convert("f", "f", 1, &pair, 0).unwrap();
        assert_eq!(
            row.prompt,
            vec![
                Some("Human: q1".into()),
                Some("Assistant: a1".into()),
                Some("Human: q2".into())
            ]
        );
        let (chosen, rejected) = if row.label == Some(LABEL_A) {
            (&row.response_a, &row.response_b)
        } else {
            (&row.response_b, &row.response_a)
        };
        assert_eq!(chosen, &vec![Some("good".to_string())]);
        assert_eq!(rejected, &vec![Some("bad".to_string())]);
        assert_eq!(
            row.model_a.as_deref() == Some("chosen"),
            row.label == Some(LABEL_A)
        );
    }
}
