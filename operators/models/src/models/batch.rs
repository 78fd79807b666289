//! A batch of token rows padded to one length, and the position each row is pooled at.

use crate::error::{ModelError, Result};

/// Where padding goes in a batch of rows of different lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingSide {
    Right,
    Left,
}

/// A batch of token rows padded to one length, with its attention mask.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// rows x seq_len, row-major.
    pub input_ids: Vec<u32>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<u8>,
}

impl PaddedBatch {
    /// Pads `rows` with `pad_id` on `side` to the longest row.
    pub fn pad(rows: &[&[u32]], pad_id: u32, side: PaddingSide) -> Result<Self> {
        let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if rows.is_empty() || seq_len == 0 {
            return Err(ModelError::Input(
                "a batch needs at least one row with at least one token".into(),
            ));
        }
        let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
        let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
        for row in rows {
            let pad = seq_len - row.len();
            if side == PaddingSide::Left {
                input_ids.extend(std::iter::repeat_n(pad_id, pad));
                attention_mask.extend(std::iter::repeat_n(0u8, pad));
            }
            input_ids.extend_from_slice(row);
            attention_mask.extend(std::iter::repeat_n(1u8, row.len()));
            if side == PaddingSide::Right {
                input_ids.extend(std::iter::repeat_n(pad_id, pad));
                attention_mask.extend(std::iter::repeat_n(0u8, pad));
            }
        }
        Ok(Self {
            rows: rows.len(),
            seq_len,
            input_ids,
            attention_mask,
        })
    }

    /// Real tokens in the batch.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().map(|&m| m as usize).sum()
    }
}

/// The position each row is pooled at: the rightmost token that is not `pad_token_id`
/// (position 0 when every token is padding), or the last position when there is no pad
/// token and the batch has one row; more rows with no pad token is an error, as in
/// transformers.
pub fn pool_positions(batch: &PaddedBatch, pad_token_id: Option<u32>) -> Result<Vec<usize>> {
    let s = batch.seq_len;
    match pad_token_id {
        None if batch.rows == 1 => Ok(vec![s - 1]),
        None => Err(ModelError::Config(
            "config.json has no pad_token_id, so rows of a batch cannot be told from their padding; set pad_token_id".into(),
        )),
        Some(pad) => Ok(batch
            .input_ids
            .chunks(s)
            .map(|row| row.iter().rposition(|&t| t != pad).unwrap_or(0))
            .collect()),
    }
}
