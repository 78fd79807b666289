//! Training checkpoints: everything a killed run needs to continue as if it had not been
//! killed — the trainable tensors, AdamW's moments and step count, the step reached, the
//! information-gain state, the best evaluation and the events so far. The data order and
//! the dropout masks are functions of the seed and the step, so they need no state.
//! Written whole or not at all: into a sibling folder, then swapped into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::info_gain::InfoGain;
use super::trainer::{Best, Trainer};
use super::{Event, TrainConfig};
use crate::checkpoint::write_safetensors;
use crate::error::{ModelError, Result};

const TENSORS: &str = "state.safetensors";
const META: &str = "state.json";

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    config: TrainConfig,
    rows_hash: String,
    names: Vec<String>,
    next_step: usize,
    optimizer_steps: u64,
    info_gain: Option<InfoGain>,
    best: Option<(usize, f64)>,
    events: Vec<Event>,
}

/// Writes the trainer's state to `dir` atomically (replacing an older checkpoint).
pub fn save(trainer: &Trainer, dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (i, name) in trainer.names.iter().enumerate() {
        tensors.push((format!("param.{name}"), trainer.vars[i].as_tensor().clone()));
        tensors.push((
            format!("exp_avg.{name}"),
            trainer.optimizer.exp_avg[i].clone(),
        ));
        tensors.push((
            format!("exp_avg_sq.{name}"),
            trainer.optimizer.exp_avg_sq[i].clone(),
        ));
        if let Some(best) = &trainer.best {
            tensors.push((format!("best.{name}"), best.tensors[i].clone()));
        }
    }
    let meta = Meta {
        config: trainer.config.clone(),
        rows_hash: trainer.rows_hash(),
        names: trainer.names.clone(),
        next_step: trainer.next_step,
        optimizer_steps: trainer.optimizer.steps,
        info_gain: trainer.info_gain.clone(),
        best: trainer.best.as_ref().map(|b| (b.step, b.log_loss)),
        events: trainer.events.clone(),
    };
    let fresh = sibling(dir, "new");
    let old = sibling(dir, "old");
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir_all(&fresh).map_err(|e| ModelError::io(&fresh, e))?;
    write_safetensors(&fresh.join(TENSORS), &tensors)?;
    let text = serde_json::to_string_pretty(&meta)
        .map_err(|e| ModelError::file(fresh.join(META), e.to_string()))?;
    write_synced(&fresh.join(META), text.as_bytes())?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
    }
    std::fs::rename(&fresh, dir).map_err(|e| ModelError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Whether `dir` (or the previous checkpoint a kill between the two renames left) holds a
/// checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join(META).is_file() || sibling(dir, "old").join(META).is_file()
}

/// Continues `trainer` (built with the same model, settings and rows) from the checkpoint
/// in `dir`; the settings and rows must be those it was made with.
pub fn restore(trainer: &mut Trainer, dir: &Path) -> Result<()> {
    let dir = if dir.join(META).is_file() {
        dir.to_path_buf()
    } else {
        sibling(dir, "old")
    };
    let meta_path = dir.join(META);
    let text = std::fs::read_to_string(&meta_path).map_err(|e| ModelError::io(&meta_path, e))?;
    let meta: Meta = serde_json::from_str(&text).map_err(|e| {
        ModelError::file(
            &meta_path,
            format!("not a training checkpoint ({e}); delete the folder to start over"),
        )
    })?;
    if meta.config != trainer.config {
        return Err(ModelError::file(
            &meta_path,
            "the checkpoint was made with other training settings; delete it to start over",
        ));
    }
    if meta.rows_hash != trainer.rows_hash() {
        return Err(ModelError::file(
            &meta_path,
            "the checkpoint was made from other rows; delete it to start over",
        ));
    }
    if meta.names != trainer.names {
        return Err(ModelError::file(
            &meta_path,
            "the checkpoint's trainable tensors are not this model's",
        ));
    }
    let path = dir.join(TENSORS);
    let device = trainer.model.device().clone();
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| ModelError::file(&path, e.to_string()))?;
    let mut take = |name: String| -> Result<Tensor> {
        let t = tensors
            .remove(&name)
            .ok_or_else(|| ModelError::file(&path, format!("no tensor {name}")))?;
        Ok(t.to_device(&device)?)
    };
    let mut best_tensors = Vec::new();
    for (i, name) in trainer.names.clone().iter().enumerate() {
        trainer.vars[i].set(&take(format!("param.{name}"))?)?;
        trainer.optimizer.exp_avg[i] = take(format!("exp_avg.{name}"))?;
        trainer.optimizer.exp_avg_sq[i] = take(format!("exp_avg_sq.{name}"))?;
        if meta.best.is_some() {
            best_tensors.push(take(format!("best.{name}"))?);
        }
    }
    trainer.next_step = meta.next_step;
    trainer.optimizer.steps = meta.optimizer_steps;
    trainer.info_gain = meta.info_gain;
    trainer.best = meta.best.map(|(step, log_loss)| Best {
        log_loss,
        step,
        tensors: best_tensors,
    });
    trainer.events = meta.events;
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
    file.write_all(bytes).map_err(|e| ModelError::io(path, e))?;
    file.sync_all().map_err(|e| ModelError::io(path, e))
}
