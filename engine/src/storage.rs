//! Local paths and `s3://bucket/key` URLs through object_store.
//!
//! S3 is configured from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
//! AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP, ...), never from a plan file.

use std::sync::Arc;

use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::error::{EngineError, Result};

/// A file or folder, local or on S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub store_url: ObjectStoreUrl,
    pub path: Path,
    local: bool,
}

fn normalise(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

impl Location {
    pub fn parse(location: &str) -> Result<Self> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let url = Url::parse(location)
                .map_err(|e| EngineError::Invalid(format!("{location}: not a valid URL: {e}")))?;
            let bucket = rest.split('/').next().unwrap_or_default();
            if bucket.is_empty() {
                return Err(EngineError::Invalid(format!(
                    "{location}: no bucket in the S3 URL"
                )));
            }
            let key = url.path().trim_matches('/');
            return Ok(Self {
                store_url: ObjectStoreUrl::parse(format!("s3://{bucket}"))?,
                path: Path::from(key),
                local: false,
            });
        }
        if location.contains("://") {
            return Err(EngineError::Invalid(format!(
                "{location}: only local paths and s3:// URLs are supported"
            )));
        }
        let absolute = normalise(&std::path::absolute(location)?);
        let path = Path::from_absolute_path(&absolute)
            .map_err(|e| EngineError::Invalid(format!("{location}: {e}")))?;
        Ok(Self {
            store_url: ObjectStoreUrl::local_filesystem(),
            path,
            local: true,
        })
    }

    pub fn is_local(&self) -> bool {
        self.local
    }

    pub fn join(&self, relative: &str) -> Self {
        let mut path = self.path.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        Self {
            path,
            ..self.clone()
        }
    }

    /// `relative` such that `base.join(relative) == self`, if `self` lies under `base`.
    pub fn relative_to(&self, base: &Self) -> Option<String> {
        if self.store_url != base.store_url {
            return None;
        }
        let parts: Vec<_> = self
            .path
            .prefix_match(&base.path)?
            .map(|p| p.as_ref().to_string())
            .collect();
        (!parts.is_empty()).then(|| parts.join("/"))
    }

    /// The form DataFusion SQL takes: an absolute path, or the s3:// URL.
    pub fn sql(&self) -> String {
        if self.local {
            format!("/{}", self.path)
        } else {
            format!("{}{}", self.store_url.as_str(), self.path)
        }
    }

    pub fn store(&self, ctx: &SessionContext) -> Result<Arc<dyn ObjectStore>> {
        Ok(ctx.runtime_env().object_store(&self.store_url)?)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sql())
    }
}

/// Registers an S3 store for every `s3://bucket` the text names (once per bucket).
pub fn register_s3_buckets(ctx: &SessionContext, text: &str) -> Result<()> {
    for (at, _) in text.match_indices("s3://") {
        let bucket: String = text[at + 5..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            .collect();
        if bucket.is_empty() {
            continue;
        }
        let url = ObjectStoreUrl::parse(format!("s3://{bucket}"))?;
        if ctx.runtime_env().object_store(&url).is_ok() {
            continue;
        }
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .build()?;
        ctx.register_object_store(url.as_ref(), Arc::new(store));
    }
    Ok(())
}

/// The objects at a location: the one object itself, or everything under it as a folder.
pub async fn objects_under(
    store: &dyn ObjectStore,
    location: &Location,
) -> Result<Vec<ObjectMeta>> {
    if !location.path.as_ref().is_empty() {
        match store.head(&location.path).await {
            Ok(meta) => return Ok(vec![meta]),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) if location.is_local() && std::path::Path::new(&location.sql()).is_dir() => {
                tracing::debug!("{location} is a folder: {e}")
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut objects: Vec<ObjectMeta> = store.list(Some(&location.path)).try_collect().await?;
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(objects)
}

/// Moves a file or folder; what was at the destination must have been removed first.
pub async fn move_tree(store: &dyn ObjectStore, from: &Location, to: &Location) -> Result<()> {
    for object in objects_under(store, from).await? {
        let destination = match object.location.prefix_match(&from.path) {
            Some(parts) => parts.fold(to.path.clone(), |path, part| path.join(part)),
            None => to.path.clone(),
        };
        store.rename(&object.location, &destination).await?;
    }
    Ok(())
}

pub async fn delete_tree(store: &dyn ObjectStore, location: &Location) -> Result<()> {
    for object in objects_under(store, location).await? {
        store.delete(&object.location).await?;
    }
    if location.is_local() {
        let path = location.sql();
        if std::path::Path::new(&path).is_dir() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// One input file as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Hashes every file at a location (a file, or all files under a folder).
pub async fn hash_location(store: &dyn ObjectStore, location: &Location) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for object in objects_under(store, location).await? {
        let mut hasher = Sha256::new();
        let mut chunks = store.get(&object.location).await?.into_stream();
        while let Some(chunk) = chunks.try_next().await? {
            hasher.update(&chunk);
        }
        let path = Location {
            path: object.location.clone(),
            ..location.clone()
        }
        .sql();
        files.push(InputFile {
            path,
            bytes: object.size,
            sha256: hex::encode(hasher.finalize()),
        });
    }
    Ok(files)
}

/// One file of a recorded output: its path relative to the run directory, size and
/// content hash (xxh3-128, fast enough to check every output each run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub path: String,
    pub bytes: u64,
    pub xxh3: String,
}

/// Hashes every file at `location` (a file, or all files under a folder), with paths
/// relative to `run_dir`, sorted by path.
pub async fn hash_output(
    store: &dyn ObjectStore,
    run_dir: &Location,
    location: &Location,
) -> Result<Vec<OutputFile>> {
    let mut files = Vec::new();
    for object in objects_under(store, location).await? {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut chunks = store.get(&object.location).await?.into_stream();
        while let Some(chunk) = chunks.try_next().await? {
            hasher.update(&chunk);
        }
        let path = object
            .location
            .prefix_match(&run_dir.path)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_else(|| object.location.to_string());
        files.push(OutputFile {
            path,
            bytes: object.size,
            xxh3: format!("{:032x}", hasher.digest128()),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// What differs between the files an output was recorded with and those there now:
/// one line per missing, changed or unrecorded file.
pub fn output_changes(recorded: &[OutputFile], now: &[OutputFile]) -> Vec<String> {
    let mut changes = Vec::new();
    for file in recorded {
        match now.iter().find(|f| f.path == file.path) {
            None => changes.push(format!("{} is missing", file.path)),
            Some(f) if f.bytes != file.bytes => changes.push(format!(
                "{} has {} bytes, recorded {}",
                file.path, f.bytes, file.bytes
            )),
            Some(f) if f.xxh3 != file.xxh3 => {
                changes.push(format!("{} changed (its content hash differs)", file.path))
            }
            Some(_) => {}
        }
    }
    for file in now {
        if !recorded.iter().any(|f| f.path == file.path) {
            changes.push(format!("{} is not part of the recorded output", file.path));
        }
    }
    changes
}

/// An error message with what to do where it comes from missing S3 credentials: without
/// them object_store asks the EC2 instance metadata service, whose failure (a timeout or a
/// 403 from 169.254.169.254) names nothing the user set.
pub fn explain(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    let credentials = [
        "169.254.169.254",
        "token request",
        "instance metadata",
        "credential",
    ]
    .iter()
    .any(|p| lower.contains(p));
    let keys_set = std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
        && std::env::var_os("AWS_SECRET_ACCESS_KEY").is_some();
    if credentials && !keys_set && !message.contains("S3 has no credentials") {
        format!(
            "{message}\n  S3 has no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_REGION; AWS_ENDPOINT_URL and AWS_ALLOW_HTTP for a store that is not AWS). Without them the EC2 instance metadata service is asked, and this is its answer"
        )
    } else {
        message.to_string()
    }
}

pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    hex::encode(Sha256::digest(data.as_ref()))
}
