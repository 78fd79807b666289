//! Models from the Hugging Face hub through hf-hub: token from `HF_TOKEN` or the hub's token
//! file (never from a plan or a log line), the local cache honoured, and `HF_HUB_OFFLINE=1`
//! answered from the cache alone with an error naming what is missing.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{ModelError, Result};

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

fn repo_of(spec: &str) -> Repo {
    match spec.split_once('@') {
        Some((id, revision)) => {
            Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string())
        }
        None => Repo::new(spec.to_string(), RepoType::Model),
    }
}

/// The snapshot folder holding `config.json` and the safetensors of hub model `spec`,
/// downloading what the cache lacks (unless offline).
pub fn fetch_model(spec: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let repo = repo_of(spec);
    if offline() {
        let cached = cache.repo(repo.clone());
        let mut missing = Vec::new();
        let config = cached.get("config.json");
        if config.is_none() {
            missing.push("config.json".to_string());
        }
        match cached.get("model.safetensors.index.json") {
            Some(index) => {
                for name in shard_names(&index)? {
                    if cached.get(&name).is_none() {
                        missing.push(name);
                    }
                }
            }
            None => {
                if cached.get("model.safetensors").is_none() {
                    missing.push(
                        "model.safetensors (or model.safetensors.index.json and its shards)".into(),
                    );
                }
            }
        }
        if !missing.is_empty() {
            return Err(ModelError::Hub(format!(
                "{spec}: HF_HUB_OFFLINE is set and the cache {} lacks: {}",
                cache.path().display(),
                missing.join(", ")
            )));
        }
        let config = config.expect("checked above");
        return Ok(config.parent().map(PathBuf::from).unwrap_or_default());
    }
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache)
        .with_token(token)
        .with_progress(false)
        .build()
        .map_err(|e| ModelError::Hub(format!("{spec}: {e}")))?;
    let remote = api.repo(repo);
    let get = |file: &str| {
        remote
            .get(file)
            .map_err(|e| ModelError::Hub(format!("{spec}: {file}: {e}")))
    };
    let config = get("config.json")?;
    match remote.get("model.safetensors.index.json") {
        Ok(index) => {
            for name in shard_names(&index)? {
                get(&name)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config.parent().map(PathBuf::from).unwrap_or_default())
}

fn shard_names(index: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(index, format!("not JSON: {e}")))?;
    let mut names: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::file(index, "no `weight_map` object"))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}
