//! Named weight tensors for the model constructors, from safetensors, a GGUF or PyTorch
//! `pytorch_model.bin` checkpoints (`pickle.rs`; used only when a folder has no
//! safetensors).
//!
//! Implements the loading half of `../shared/specs/pipeline.md` §5. Model files ask for
//! tensors by their Hugging Face names and expected shapes; this module answers with a
//! tensor in the target dtype on the target device or a [`ModelError`] that names the file,
//! the tensor and the fix. It plays the part of candle's `VarBuilder`, with better error
//! messages.
//!
//! Decision: every tensor is converted to the model dtype ([`Weights::with_dtype`], f32 by
//! default) one tensor at a time as it is loaded, on the target device, so no f32 copy of
//! a bf16/f16 model is ever held; an f32 model of an f16/bf16 checkpoint takes twice its
//! file size in memory, a bf16 one the file size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use super::error::{IndexError, ModelError};

/// Where the tensors come from.
enum Store {
    /// Safetensors files (one, or the shards of an index), read tensor by tensor with
    /// positioned reads ([`super::st_file`]: no memory map, no second copy), and, per
    /// tensor name, the file that holds it.
    Safetensors {
        files: Vec<(PathBuf, super::st_file::StFile)>,
        index: HashMap<String, usize>,
    },
    /// No checkpoint: every tensor asked for has the shape asked for (`saepipe plan`'s
    /// shape count and calibration model). `materialise = false` answers with a
    /// zero-stride broadcast of one zero (no memory), else with [`Weights::randomize`]'s
    /// values.
    Synthetic { materialise: bool },
    /// Tensors already in memory (dequantised GGUF), all from `origin`.
    Memory(HashMap<String, Tensor>),
    /// PyTorch zip checkpoints, read tensor by tensor without running pickled code.
    Pickle(super::pickle::PthStore),
}

/// A checkpoint's tensors, looked up by Hugging Face name.
pub struct Weights {
    origin: PathBuf,
    model_type: String,
    device: Device,
    /// The dtype every tensor is converted to (f32, bf16 or f16).
    dtype: DType,
    store: Store,
    /// `(seed, σ)`: answer every request with a seeded random tensor instead (the
    /// randomised-LLM control); shapes are still checked against the checkpoint.
    random: Option<(u64, f32)>,
    /// Values of every tensor asked for so far (a tied embedding counts once).
    requested: AtomicU64,
}

impl Weights {
    /// Open `model.safetensors`, or the shards listed by `model.safetensors.index.json`,
    /// in `dir`.
    pub fn from_dir(dir: &Path, model_type: &str, device: &Device) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            shard_paths(&index_path)?
        } else if let Some(paths) = pytorch_paths(dir)? {
            return Ok(Self {
                origin: dir.to_path_buf(),
                model_type: model_type.to_string(),
                device: device.clone(),
                dtype: DType::F32,
                store: Store::Pickle(super::pickle::PthStore::open(&paths)?),
                random: None,
                requested: AtomicU64::new(0),
            });
        } else {
            return Err(ModelError::WeightsMissing {
                dir: dir.to_path_buf(),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            if !path.is_file() {
                return Err(ModelError::Io {
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in model.safetensors.index.json is missing",
                    ),
                    path,
                });
            }
            let st = super::st_file::StFile::open(&path)?;
            for name in st.names() {
                index.insert(name.clone(), i);
            }
            files.push((path, st));
        }
        Ok(Self {
            origin: dir.to_path_buf(),
            model_type: model_type.to_string(),
            device: device.clone(),
            dtype: DType::F32,
            store: Store::Safetensors { files, index },
            random: None,
            requested: AtomicU64::new(0),
        })
    }

    /// Weights without a checkpoint, for building a model of a config's shape
    /// (`Store::Synthetic`): `random = Some((seed, σ))` gives every tensor
    /// [`Weights::randomize`]'s values, `None` a zero-stride broadcast that costs no memory
    /// (enough to build the model and count its parameters, not to run it).
    pub fn synthetic(
        origin: &Path,
        model_type: &str,
        device: &Device,
        random: Option<(u64, f32)>,
    ) -> Self {
        Self {
            origin: origin.to_path_buf(),
            model_type: model_type.to_string(),
            device: device.clone(),
            dtype: DType::F32,
            store: Store::Synthetic {
                materialise: random.is_some(),
            },
            random,
            requested: AtomicU64::new(0),
        }
    }

    /// Values (parameters) of every tensor asked for through [`Weights::get`] so far.
    pub fn requested_values(&self) -> u64 {
        self.requested.load(Ordering::Relaxed)
    }

    /// Tensors already in memory (e.g. dequantised from the GGUF at `origin`), moved to
    /// `device` and converted to [`Weights::dtype`] when asked for.
    pub fn from_tensors(
        origin: &Path,
        model_type: &str,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Self {
        Self {
            origin: origin.to_path_buf(),
            model_type: model_type.to_string(),
            device: device.clone(),
            dtype: DType::F32,
            store: Store::Memory(tensors),
            random: None,
            requested: AtomicU64::new(0),
        }
    }

    /// Convert every tensor to `dtype` (f32, bf16 or f16) as it is loaded.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Answer every later [`Weights::get`] with a random re-initialisation seeded by `seed`
    /// and the tensor's name: `*norm.weight` → 1, `*.bias` → 0, everything else (linear
    /// weights, embeddings) ~ N(0, `std`²), as Hugging Face's `_init_weights` does.
    pub fn randomize(&mut self, seed: u64, std: f32) {
        self.random = Some((seed, std));
    }

    fn random_tensor(
        &self,
        name: &str,
        shape: &[usize],
        seed: u64,
        std: f32,
    ) -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            // FNV-1a of the name, so each tensor's values do not depend on load order.
            let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let mut rng = crate::util::rng::Rng::new(seed ^ h);
            (0..n).map(|_| rng.normal() as f32 * std).collect()
        };
        Tensor::from_vec(data, shape, &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(ModelError::candle(&self.origin))
    }

    /// The directory or file the weights come from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint has a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Safetensors { index, .. } => index.contains_key(name),
            Store::Memory(m) => m.contains_key(name),
            Store::Pickle(p) => p.contains(name),
            Store::Synthetic { .. } => false,
        }
    }

    /// The tensor `name` as contiguous [`Weights::dtype`] on the target device, checked to
    /// have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.requested
            .fetch_add(shape.iter().product::<usize>() as u64, Ordering::Relaxed);
        if let Store::Synthetic { materialise } = self.store {
            return match (materialise, self.random) {
                (true, Some((seed, std))) => self.random_tensor(name, shape, seed, std),
                _ => Tensor::zeros((), DType::F32, &self.device)
                    .and_then(|z| z.broadcast_as(shape))
                    .map_err(ModelError::candle(&self.origin)),
            };
        }
        let loaded = self.get_stored(name, shape)?;
        match self.random {
            Some((seed, std)) => self.random_tensor(name, loaded.dims(), seed, std),
            None => Ok(loaded),
        }
    }

    fn get_stored(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let (path, tensor) = match &self.store {
            Store::Safetensors { files, index } => {
                let Some(&i) = index.get(name) else {
                    return Err(self.missing(name, files.first().map(|f| f.0.as_path())));
                };
                let (path, st) = &files[i];
                let found = st
                    .shape(name)
                    .ok_or_else(|| self.missing(name, Some(path)))?;
                self.check_shape(path, name, shape, found)?;
                let t = st
                    .load(name, &self.device)?
                    .ok_or_else(|| self.missing(name, Some(path)))?;
                (path.as_path(), t)
            }
            Store::Memory(m) => {
                let Some(t) = m.get(name) else {
                    return Err(self.missing(name, None));
                };
                self.check_shape(&self.origin, name, shape, t.dims())?;
                let t = t
                    .to_device(&self.device)
                    .map_err(ModelError::candle(&self.origin))?;
                (self.origin.as_path(), t)
            }
            Store::Pickle(p) => {
                let Some((path, found)) = p.shape(name) else {
                    return Err(self.missing(name, None));
                };
                self.check_shape(path, name, shape, found)?;
                let t = p
                    .load(name, &self.device)?
                    .ok_or_else(|| self.missing(name, Some(path)))?;
                (path, t)
            }
            Store::Synthetic { .. } => {
                return Err(self.missing(name, None));
            }
        };
        match tensor.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {}
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        tensor
            .to_dtype(self.dtype)
            .and_then(|t| t.contiguous())
            .map_err(ModelError::candle(path))
    }

    fn missing(&self, name: &str, file: Option<&Path>) -> ModelError {
        ModelError::MissingTensor {
            path: file.unwrap_or(&self.origin).to_path_buf(),
            name: name.to_string(),
            model_type: self.model_type.clone(),
        }
    }

    fn check_shape(
        &self,
        path: &Path,
        name: &str,
        expected: &[usize],
        found: &[usize],
    ) -> Result<(), ModelError> {
        if expected == found {
            Ok(())
        } else {
            Err(ModelError::WrongShape {
                path: path.to_path_buf(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            })
        }
    }
}

/// `pytorch_model.bin`, or the shards of `pytorch_model.bin.index.json`, in `dir`.
fn pytorch_paths(dir: &Path) -> Result<Option<Vec<PathBuf>>, ModelError> {
    let single = dir.join(super::pickle::PT_WEIGHTS_FILE);
    let index = dir.join(super::pickle::PT_WEIGHTS_INDEX_FILE);
    if single.is_file() {
        Ok(Some(vec![single]))
    } else if index.is_file() {
        let paths = shard_paths(&index)?;
        if let Some(p) = paths.iter().find(|p| !p.is_file()) {
            return Err(ModelError::Io {
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "shard listed in pytorch_model.bin.index.json is missing",
                ),
                path: p.clone(),
            });
        }
        Ok(Some(paths))
    } else {
        Ok(None)
    }
}

/// The shard file names a `model.safetensors.index.json` lists (its `weight_map` values),
/// sorted and deduplicated, each checked to be a plain relative name inside the model
/// folder.
///
/// Decision: this is the one check both `local:<dir>` resolution (capture, download) and
/// the loader (trace, every stage that opens the weights) go through, so a `weight_map`
/// entry such as `../other/model.safetensors` or `/abs/path` is refused with the same
/// error everywhere instead of being followed by one command and refused by another.
pub fn index_shard_names(index: &Path) -> Result<Vec<String>, IndexError> {
    let bad = |message: String| IndexError {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(format!("cannot read: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
    let mut names = std::collections::BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
        let plain = !f.is_empty()
            && !f.starts_with(['/', '\\'])
            && !f.contains(':')
            && !f
                .split(['/', '\\'])
                .any(|c| c == ".." || c == "." || c.is_empty());
        if !plain {
            return Err(bad(format!(
                "shard name '{f}' (weight_map[{tensor}]) is not a plain relative file name \
                 inside the model folder; every shard must sit beside the index — fix the \
                 entry or copy the shard into the folder"
            )));
        }
        names.insert(f.to_string());
    }
    if names.is_empty() {
        return Err(bad("weight_map is empty".to_string()));
    }
    Ok(names.into_iter().collect())
}

/// The shard files named by a `model.safetensors.index.json` ([`index_shard_names`]).
fn shard_paths(index_path: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let dir = index_path.parent().unwrap_or(Path::new("."));
    Ok(index_shard_names(index_path)?
        .into_iter()
        .map(|f| dir.join(f))
        .collect())
}
