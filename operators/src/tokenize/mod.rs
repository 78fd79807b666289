//! The `tokenize` operator: from the canonical table's turns to model input. One template,
//! one truncation, for training and inference alike (DESIGN.md rule 4).

pub mod exec;
pub mod template;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::error::{OperatorError, Result};
pub use template::{Piece, Slot, Template};

/// The special tokens a tokenizer's post-processor puts before and after a text: encoding
/// the empty text with special tokens gives exactly those.
fn specials_around_text(inner: &Tokenizer) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
    let probe = inner.encode("", true).map_err(|e| e.to_string())?;
    let ids = probe.get_ids();
    let prefix: Vec<u32> = ids
        .iter()
        .zip(probe.get_special_tokens_mask())
        .take_while(|(_, s)| **s == 1)
        .map(|(id, _)| *id)
        .collect();
    let suffix = ids[prefix.len()..].to_vec();
    Ok((prefix, suffix))
}

/// A Hugging Face `tokenizer.json`, with the special tokens it adds around a text and the EOS
/// token named by the `tokenizer_config.json` beside it.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub path: PathBuf,
    /// What encoding with special tokens puts before the text (BOS for Llama-3 and Gemma).
    pub prefix: Vec<u32>,
    /// ... and after it.
    pub suffix: Vec<u32>,
    pub eos: Option<(String, u32)>,
    pub pad_id: Option<u32>,
}

impl TextTokenizer {
    /// The tokenizer embedded in a GGUF file (GPT-2-style byte-level BPE: the vocabulary
    /// and merges of `tokenizer.ggml.*`, through candle's `TokenizerFromGguf`), with BOS as
    /// `add_bos_token` says and EOS and padding from their token ids.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        use candle_core::quantized::gguf_file;
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        let err = |message: String| OperatorError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|e| OperatorError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| err(format!("not a GGUF file: {e}")))?;
        let mut inner = Tokenizer::from_gguf(&content).map_err(|e| err(e.to_string()))?;
        // candle's default (GPT-2) pipeline adds a prefix space; the file says whether to,
        // and llama.cpp's `smollm` pre-tokenizer splits digits one by one first.
        let text = |key: &str| match content.metadata.get(key) {
            Some(gguf_file::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let prefix_space = match content.metadata.get("tokenizer.ggml.add_space_prefix") {
            Some(gguf_file::Value::Bool(b)) => *b,
            _ => false,
        };
        match text("tokenizer.ggml.pre").as_deref() {
            Some("qwen2" | "llama3" | "smaug-bpe" | "lfm2") => {}
            pre => {
                use tokenizers::pre_tokenizers::{
                    byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
                };
                let byte_level = ByteLevel::new(prefix_space, true, true);
                let pre_tokenizer: PreTokenizerWrapper = if pre == Some("smollm") {
                    Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
                } else {
                    byte_level.into()
                };
                inner.with_pre_tokenizer(Some(pre_tokenizer));
            }
        }
        let (prefix, suffix) = specials_around_text(&inner).map_err(err)?;
        let token_id = |key: &str| -> Option<u32> {
            match content.metadata.get(key)? {
                gguf_file::Value::U32(v) => Some(*v),
                gguf_file::Value::I32(v) => u32::try_from(*v).ok(),
                gguf_file::Value::U64(v) => u32::try_from(*v).ok(),
                _ => None,
            }
        };
        let eos = match token_id("tokenizer.ggml.eos_token_id") {
            Some(id) => Some((
                inner
                    .id_to_token(id)
                    .ok_or_else(|| err(format!("eos_token_id {id} is not in the vocabulary")))?,
                id,
            )),
            None => None,
        };
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            prefix,
            suffix,
            eos,
            pad_id: token_id("tokenizer.ggml.padding_token_id"),
        })
    }

    pub fn open(path: &Path) -> Result<Self> {
        let err = |message: String| OperatorError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        if path.extension().is_some_and(|e| e == "gguf") {
            return Self::open_gguf(path);
        }
        let inner = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let (mut prefix, suffix) = specials_around_text(&inner).map_err(err)?;
        let config = path.with_file_name("tokenizer_config.json");
        let (mut eos, mut pad, mut bos) = (None, None, None);
        if config.is_file() {
            let text =
                std::fs::read_to_string(&config).map_err(|e| OperatorError::io(&config, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| OperatorError::file(&config, format!("not JSON: {e}")))?;
            let token = |key: &str| -> Option<String> {
                match json.get(key) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Object(o)) => o
                        .get("content")
                        .and_then(|c| c.as_str())
                        .map(str::to_string),
                    _ => None,
                }
            };
            eos = token("eos_token");
            pad = token("pad_token");
            // A tokenizer.json without a BOS-adding post-processor (some Llama-3 exports)
            // still gets the BOS its config names, unless the config turns it off.
            if prefix.is_empty()
                && json.get("add_bos_token") != Some(&serde_json::Value::Bool(false))
            {
                bos = token("bos_token");
            }
        }
        let id_of = |name: &str| {
            inner.token_to_id(name).ok_or_else(|| {
                err(format!(
                    "the special token `{name}` of tokenizer_config.json is not in the vocabulary"
                ))
            })
        };
        let eos = match eos {
            Some(name) => Some((name.clone(), id_of(&name)?)),
            None => None,
        };
        if let Some(name) = bos {
            prefix.push(id_of(&name)?);
        }
        let pad_id = match pad {
            Some(name) => Some(id_of(&name)?),
            None => None,
        };
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            prefix,
            suffix,
            eos,
            pad_id,
        })
    }

    /// Token ids of `text` without special tokens added (special tokens written in the text
    /// are still recognised, as in transformers).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| OperatorError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Token ids of `text` with the tokenizer's special tokens (BOS).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.prefix.clone();
        ids.extend(self.encode_plain(text)?);
        ids.extend_from_slice(&self.suffix);
        Ok(ids)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// How a too-long input is cut to the maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// The 1st place's: the prompt capped (256 tokens), the longer answer trimmed until both
    /// are equal, then both alternately; heads are kept.
    Balanced,
    /// Keep the beginning: the slots are filled in text order and cut at the end.
    Right,
    /// Keep the end: the slots are filled from the last and cut at their beginning.
    Left,
}

impl Truncation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "balanced" => Ok(Self::Balanced),
            "right" => Ok(Self::Right),
            "left" => Ok(Self::Left),
            other => Err(OperatorError::Input(format!(
                "truncation `{other}` is not one of balanced, right, left"
            ))),
        }
    }
}

/// Which response goes in the template's A slot: `ab` as given, `ba` swapped (for TTA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ab,
    Ba,
}

impl Order {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "ab" => Ok(Self::Ab),
            "ba" => Ok(Self::Ba),
            other => Err(OperatorError::Input(format!(
                "order `{other}` is not ab or ba"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ab => "ab",
            Self::Ba => "ba",
        }
    }
}

/// Template, tokenizer, truncation and order: turns into token ids.
pub struct Encoder {
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Template,
    pub max_length: usize,
    pub truncation: Truncation,
    pub order: Order,
    pub prompt_cap: usize,
    /// The template with its text already tokenized.
    parts: Vec<Part>,
    /// The slots in text order (for `right` and `left` truncation).
    slot_order: Vec<Slot>,
    /// Tokens every input spends outside the slots.
    overhead: usize,
    eos_id: Option<u32>,
}

/// A piece of a template, ready to copy into an input.
enum Part {
    Tokens(Vec<u32>),
    Slot(Slot),
}

/// One encoded row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub truncated: bool,
}

impl Encoder {
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        template: Template,
        max_length: usize,
        truncation: Truncation,
        order: Order,
        prompt_cap: usize,
    ) -> Result<Self> {
        let parts = template
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => tokenizer.encode_plain(t).map(Part::Tokens),
                Piece::Slot(slot) => Ok(Part::Slot(*slot)),
            })
            .collect::<Result<Vec<_>>>()?;
        let eos_id = if template.append_eos {
            let (_, id) = tokenizer.eos.clone().ok_or_else(|| OperatorError::Tokenizer {
                path: tokenizer.path.clone(),
                message: format!(
                    "template `{}` appends EOS but there is no tokenizer_config.json with an eos_token beside the tokenizer",
                    template.name
                ),
            })?;
            // A tokenizer whose post-processor already ends with EOS gets no second one.
            (tokenizer.suffix.last() != Some(&id)).then_some(id)
        } else {
            None
        };
        let overhead = tokenizer.prefix.len()
            + tokenizer.suffix.len()
            + parts
                .iter()
                .map(|p| match p {
                    Part::Tokens(t) => t.len(),
                    Part::Slot(_) => 0,
                })
                .sum::<usize>()
            + usize::from(eos_id.is_some());
        if overhead >= max_length {
            return Err(OperatorError::Input(format!(
                "max_length {max_length} leaves no room for text: template `{}` with this tokenizer takes {overhead} tokens by itself",
                template.name
            )));
        }
        Ok(Self {
            tokenizer,
            slot_order: template.slot_order(),
            template,
            max_length,
            truncation,
            order,
            prompt_cap,
            parts,
            overhead,
            eos_id,
        })
    }

    /// The text of one slot: turns joined, EOS strings inside replaced.
    fn slot_text(&self, turns: &[&str]) -> String {
        let joined = turns.join(&self.template.turn_separator);
        match &self.tokenizer.eos {
            Some((eos, _)) if !eos.is_empty() && joined.contains(eos.as_str()) => {
                joined.replace(eos.as_str(), &self.template.replace_eos_with)
            }
            _ => joined,
        }
    }

    /// Encodes one comparison.
    pub fn encode(
        &self,
        prompt: &[&str],
        response_a: &[&str],
        response_b: &[&str],
    ) -> Result<Encoded> {
        let (first, second) = match self.order {
            Order::Ab => (response_a, response_b),
            Order::Ba => (response_b, response_a),
        };
        // Indexed as `Slot::index`: prompt, the A slot's response, the B slot's.
        let slots = [
            self.tokenizer.encode_plain(&self.slot_text(prompt))?,
            self.tokenizer.encode_plain(&self.slot_text(first))?,
            self.tokenizer.encode_plain(&self.slot_text(second))?,
        ];
        let budget = self.max_length - self.overhead;
        let lengths = slots.each_ref().map(Vec::len);
        let kept = truncate(
            self.truncation,
            lengths,
            budget,
            self.prompt_cap,
            &self.slot_order,
        );
        let mut ids = Vec::with_capacity(self.overhead + kept.iter().sum::<usize>());
        ids.extend_from_slice(&self.tokenizer.prefix);
        for part in &self.parts {
            match part {
                Part::Tokens(tokens) => ids.extend_from_slice(tokens),
                Part::Slot(slot) => {
                    let (tokens, keep) = (&slots[slot.index()], kept[slot.index()]);
                    ids.extend_from_slice(match self.truncation {
                        Truncation::Left => &tokens[tokens.len() - keep..],
                        _ => &tokens[..keep],
                    });
                }
            }
        }
        ids.extend(self.eos_id);
        ids.extend_from_slice(&self.tokenizer.suffix);
        debug_assert!(ids.len() <= self.max_length);
        Ok(Encoded {
            input_ids: ids,
            truncated: kept != lengths,
        })
    }
}

/// How many tokens of (prompt, response A, response B) to keep within `budget`.
pub fn truncate(
    policy: Truncation,
    lengths: [usize; 3],
    budget: usize,
    prompt_cap: usize,
    text_order: &[Slot],
) -> [usize; 3] {
    if lengths.iter().sum::<usize>() <= budget
        && (policy != Truncation::Balanced || lengths[0] <= prompt_cap)
    {
        return lengths;
    }
    match policy {
        Truncation::Right | Truncation::Left => {
            let mut kept = [0; 3];
            let mut left = budget;
            let order: Vec<usize> = if policy == Truncation::Right {
                text_order.iter().map(|s| s.index()).collect()
            } else {
                text_order.iter().rev().map(|s| s.index()).collect()
            };
            for i in order {
                kept[i] = lengths[i].min(left);
                left -= kept[i];
            }
            kept
        }
        Truncation::Balanced => {
            let p = lengths[0].min(prompt_cap).min(budget);
            let room = budget - p;
            let (mut a, mut b) = (lengths[1], lengths[2]);
            if a + b > room {
                let excess = a + b - room;
                let (long, short) = if a >= b {
                    (&mut a, &mut b)
                } else {
                    (&mut b, &mut a)
                };
                let gap = *long - *short;
                if gap >= excess {
                    *long -= excess;
                } else {
                    // Equal first, then one token from each in turn, A first.
                    *long = *short;
                    let rest = excess - gap;
                    let (from_a, from_b) = (rest.div_ceil(2), rest / 2);
                    a = a.min(b);
                    b = a;
                    a -= from_a;
                    b -= from_b;
                }
            }
            [p, a, b]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: [Slot; 3] = [Slot::Prompt, Slot::ResponseA, Slot::ResponseB];

    #[test]
    fn balanced_caps_the_prompt_then_evens_the_answers() {
        // Fits: nothing cut.
        assert_eq!(
            truncate(Truncation::Balanced, [10, 20, 30], 100, 256, &ORDER),
            [10, 20, 30]
        );
        // Prompt over its cap is cut even when everything would fit.
        assert_eq!(
            truncate(Truncation::Balanced, [300, 10, 10], 1000, 256, &ORDER),
            [256, 10, 10]
        );
        // The longer answer alone absorbs the excess.
        assert_eq!(
            truncate(Truncation::Balanced, [10, 20, 100], 100, 256, &ORDER),
            [10, 20, 70]
        );
        // Both equalised, then trimmed alternately (A first): room 90 -> 45 / 45.
        assert_eq!(
            truncate(Truncation::Balanced, [10, 60, 100], 100, 256, &ORDER),
            [10, 45, 45]
        );
        // Odd room: A gives the extra token.
        assert_eq!(
            truncate(Truncation::Balanced, [11, 60, 100], 100, 256, &ORDER),
            [11, 44, 45]
        );
        assert_eq!(
            truncate(Truncation::Balanced, [11, 100, 60], 100, 256, &ORDER),
            [11, 44, 45]
        );
    }

    #[test]
    fn right_and_left_keep_the_beginning_or_the_end() {
        assert_eq!(
            truncate(Truncation::Right, [10, 60, 100], 100, 256, &ORDER),
            [10, 60, 30]
        );
        assert_eq!(
            truncate(Truncation::Left, [10, 60, 100], 100, 256, &ORDER),
            [0, 0, 100]
        );
        assert_eq!(
            truncate(Truncation::Left, [10, 60, 30], 80, 256, &ORDER),
            [0, 50, 30]
        );
    }

    #[test]
    fn truncation_never_exceeds_the_budget() {
        for policy in [Truncation::Balanced, Truncation::Right, Truncation::Left] {
            for p in [0, 5, 300] {
                for a in [0, 7, 90] {
                    for b in [0, 3, 120] {
                        for budget in [1, 50, 99, 400] {
                            let kept = truncate(policy, [p, a, b], budget, 256, &ORDER);
                            assert!(kept.iter().sum::<usize>() <= budget);
                            assert!(kept[0] <= p && kept[1] <= a && kept[2] <= b);
                        }
                    }
                }
            }
        }
    }
}
