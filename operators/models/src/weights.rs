//! Where a model's tensors come from, and the all-or-nothing loader over them (DESIGN.md rule
//! 2): every tensor the architecture names must be present with its shape, and no tensor may
//! be left over unless the caller names it as deliberately dropped.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// A set of named tensors: a safetensors file or shard set, a GGUF file turned into
/// Hugging Face names, or tensors already in memory.
pub enum TensorSource {
    Safetensors {
        label: String,
        files: MmapedSafetensors,
        names: BTreeSet<String>,
    },
    Memory {
        label: String,
        tensors: HashMap<String, Tensor>,
    },
    /// Seeded normal weights for every tensor asked for: benchmarks and gradient checks.
    Random { seed: u64, std: f64 },
}

impl TensorSource {
    /// Memory-maps safetensors files; with several (shards), a name may occur in only one.
    pub fn safetensors(label: impl Into<String>, paths: &[PathBuf]) -> Result<Self> {
        for path in paths {
            if !path.is_file() {
                return Err(ModelError::file(path, "no such safetensors file"));
            }
        }
        // Safety: the files are memory-mapped read-only; like every mmap user we rely on
        // nobody truncating a checkpoint while it is being loaded.
        let files = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| ModelError::Config(format!("{}: {e}", display_paths(paths))))?;
        let names = files.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(Self::Safetensors {
            label: label.into(),
            files,
            names,
        })
    }

    pub fn label(&self) -> String {
        match self {
            Self::Safetensors { label, .. } | Self::Memory { label, .. } => label.clone(),
            Self::Random { seed, .. } => format!("random weights (seed {seed})"),
        }
    }

    /// Every tensor name, or `None` for a source that makes up whatever is asked for.
    pub fn names(&self) -> Option<BTreeSet<String>> {
        match self {
            Self::Safetensors { names, .. } => Some(names.clone()),
            Self::Memory { tensors, .. } => Some(tensors.keys().cloned().collect()),
            Self::Random { .. } => None,
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors { names, .. } => names.contains(name),
            Self::Memory { tensors, .. } => tensors.contains_key(name),
            Self::Random { .. } => true,
        }
    }

    fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            Self::Safetensors { files, .. } => Ok(files.load(name, device)?),
            Self::Memory { tensors, .. } => Ok(tensors[name].to_device(device)?),
            Self::Random { seed, std } => {
                let count = shape.iter().product::<usize>();
                let seed = *seed ^ fnv1a(name.as_bytes());
                // Norm weights start near 1 so that deep random stacks stay finite.
                let centre = if name.ends_with("norm.weight") {
                    1.0
                } else {
                    0.0
                };
                if device.is_cuda() {
                    // Billions of values: drawn on the GPU (curand), seeded per tensor.
                    device.set_seed(seed)?;
                    return Ok(Tensor::randn(centre as f32, *std as f32, shape, device)?);
                }
                let mut rng = SplitMix64::new(seed);
                let values: Vec<f32> = (0..count)
                    .map(|_| (centre + std * rng.next_normal()) as f32)
                    .collect();
                Ok(Tensor::from_vec(values, shape, device)?)
            }
        }
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Takes tensors by name from one source, converting them to one dtype and device, and
/// remembers what was taken so that [`WeightLoader::finish`] can refuse a partial load.
/// Layers take their tensors through [`Weights`], a view with a name prefix.
pub struct WeightLoader<'a> {
    source: &'a TensorSource,
    device: Device,
    dtype: DType,
    gptq: Option<crate::gptq::GptqSettings>,
    record: RefCell<LoadRecord>,
}

#[derive(Default)]
struct LoadRecord {
    taken: BTreeSet<String>,
    dropped: BTreeSet<String>,
    missing: Vec<String>,
    wrong_shape: Vec<String>,
}

impl<'a> WeightLoader<'a> {
    pub fn new(source: &'a TensorSource, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            device: device.clone(),
            dtype,
            gptq: None,
            record: RefCell::default(),
        }
    }

    /// Reads the projections that carry `qweight` as GPTQ layers with these settings.
    pub fn with_gptq(mut self, gptq: Option<crate::gptq::GptqSettings>) -> Self {
        self.gptq = gptq;
        self
    }

    /// The view with no prefix.
    pub fn root(&self) -> Weights<'_, 'a> {
        Weights {
            loader: self,
            prefix: String::new(),
        }
    }

    /// The tensor `name` with `shape`, in `dtype`. A missing or misshapen tensor is recorded
    /// and zeros stand in, so that one load reports every problem at once.
    fn tensor_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let mut record = self.record.borrow_mut();
        if !self.source.contains(name) {
            record.missing.push(name.to_string());
            return Ok(Tensor::zeros(shape, dtype, &self.device)?);
        }
        record.taken.insert(name.to_string());
        let tensor = self.source.load(name, shape, &self.device)?;
        if tensor.dims() != shape {
            record.wrong_shape.push(format!(
                "{name} has shape {:?}, the config says {shape:?}",
                tensor.dims()
            ));
            return Ok(Tensor::zeros(shape, dtype, &self.device)?);
        }
        Ok(tensor.to_dtype(dtype)?)
    }

    /// Fails unless every requested tensor was there with its shape and nothing is left.
    pub fn finish(self) -> Result<()> {
        let record = self.record.into_inner();
        let unexpected: Vec<String> = match self.source.names() {
            Some(names) => names
                .into_iter()
                .filter(|n| !record.taken.contains(n) && !record.dropped.contains(n))
                .collect(),
            None => Vec::new(),
        };
        if !record.missing.is_empty() || !unexpected.is_empty() {
            return Err(ModelError::TensorMismatch {
                source_name: self.source.label(),
                missing: record.missing,
                unexpected,
            });
        }
        if !record.wrong_shape.is_empty() {
            return Err(ModelError::Config(format!(
                "{}: {}",
                self.source.label(),
                record.wrong_shape.join("; ")
            )));
        }
        Ok(())
    }
}

/// A view of a [`WeightLoader`] under a name prefix, as candle's `VarBuilder::pp`: a layer
/// names its tensors relative to where it sits (`vb.pp("self_attn").pp("q_proj")`).
#[derive(Clone)]
pub struct Weights<'l, 'a> {
    loader: &'l WeightLoader<'a>,
    prefix: String,
}

impl<'l, 'a> Weights<'l, 'a> {
    /// The view one level down: `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            loader: self.loader,
            prefix,
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The loader's dtype: the model's.
    pub fn dtype(&self) -> DType {
        self.loader.dtype
    }

    pub fn device(&self) -> &Device {
        &self.loader.device
    }

    /// The checkpoint's GPTQ settings, if it is one.
    pub fn gptq(&self) -> Option<crate::gptq::GptqSettings> {
        self.loader.gptq
    }

    /// `prefix.name`: for errors.
    pub fn name_of(&self, name: &str) -> String {
        self.path(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.loader.source.contains(&self.path(name))
    }

    /// The tensor `name` under this prefix, with `shape`, in the loader's dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.loader.dtype)
    }

    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.loader.tensor_as(&self.path(name), shape, dtype)
    }

    /// Marks a tensor the checkpoint may carry and the classifier deliberately does not use
    /// (the LM head of a causal-LM checkpoint).
    pub fn drop_if_present(&self, name: &str) {
        let path = self.path(name);
        if self.loader.source.contains(&path) {
            self.loader.record.borrow_mut().dropped.insert(path);
        }
    }
}

/// The safetensors files of a Hugging Face model folder: `model.safetensors`, or the shards
/// named by `model.safetensors.index.json` (checked against the shards' own contents).
pub fn safetensors_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::file(&index, format!("not JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::file(&index, "no `weight_map` object"))?;
        let mut files: Vec<String> = map
            .values()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ModelError::file(&index, "a `weight_map` value is not a file name")
                })
            })
            .collect::<Result<_>>()?;
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let missing: Vec<String> = paths
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::file(
                &index,
                format!(
                    "names shard files that are not there: {}",
                    missing.join(", ")
                ),
            ));
        }
        let source = TensorSource::safetensors(index.display().to_string(), &paths)?;
        let in_files = source.names().unwrap_or_default();
        let in_index: BTreeSet<String> = map.keys().cloned().collect();
        if in_files != in_index {
            let only_index: Vec<_> = in_index.difference(&in_files).cloned().collect();
            let only_files: Vec<_> = in_files.difference(&in_index).cloned().collect();
            return Err(ModelError::file(
                &index,
                format!(
                    "the index and the shards disagree: in the index only: [{}]; in the shards only: [{}]",
                    only_index.join(", "),
                    only_files.join(", ")
                ),
            ));
        }
        return Ok(paths);
    }
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::file(
        dir,
        format!("neither {stem}.safetensors nor {stem}.safetensors.index.json is there"),
    ))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A small seeded generator: random weights must not depend on a global RNG.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn next_uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let (u1, u2) = (self.next_uniform(), self.next_uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}
