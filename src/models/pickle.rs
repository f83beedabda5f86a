//! PyTorch checkpoints (`pytorch_model.bin`, or the shards of
//! `pytorch_model.bin.index.json`) read without executing any pickled code.
//!
//! Implements issue 14 item 6: Pythia's training checkpoints (the `stepN` branches) exist
//! only as `pytorch_model.bin`. The file is torch's zip format: `<prefix>/data.pkl` (a
//! pickle of the state dict whose tensors are `torch._utils._rebuild_tensor_v2` calls on
//! persistent ids `('storage', torch.FloatStorage, key, 'cpu', numel)`) and
//! `<prefix>/data/<key>` (the raw little-endian storage bytes).
//!
//! Decision: the pickle is parsed by candle's restricted reader (`candle_core::pickle`),
//! which builds a tree of objects and never calls anything. On top of that every global
//! the pickle names must be on [`ALLOWED`] (the tensor-rebuild functions, the storage
//! classes, `OrderedDict`); any other (`posix.system`, `builtins.eval`, …) refuses the
//! whole file with an error naming it, since such a file was not written by
//! `torch.save(state_dict)` and is not something to guess about.
//! Decision: tensors are read one at a time from the zip when the model asks for them
//! (like the memory-mapped safetensors), converted to f32 by the caller; entries that are
//! not plain tensors of a dtype candle reads (e.g. GPT-NeoX's boolean `attention.bias`
//! mask buffers) are skipped, and asking for one says it is missing.
//! Decision: the legacy (pre-1.6, non-zip) torch format is refused with a message.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

use super::error::ModelError;

/// Unsharded PyTorch weights.
pub const PT_WEIGHTS_FILE: &str = "pytorch_model.bin";
/// Index of sharded PyTorch weights.
pub const PT_WEIGHTS_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// The globals (`module`, `name`) a state-dict pickle may name; anything else is refused.
pub const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

fn bad(path: &Path, detail: impl std::fmt::Display) -> ModelError {
    ModelError::Pickle {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// The first global of `obj` (depth first) that is not on [`ALLOWED`].
fn forbidden_global(obj: &Object) -> Option<String> {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => (!ALLOWED
            .iter()
            .any(|(m, c)| m == module_name && c == class_name))
        .then(|| format!("{module_name}.{class_name}")),
        Object::Tuple(v) | Object::List(v) => v.iter().find_map(forbidden_global),
        Object::Dict(kv) => kv
            .iter()
            .find_map(|(k, v)| forbidden_global(k).or_else(|| forbidden_global(v))),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            forbidden_global(callable).or_else(|| forbidden_global(args))
        }
        Object::PersistentLoad(o) => forbidden_global(o),
        _ => None,
    }
}

/// One opened checkpoint file: its zip and the tensors its pickle describes.
struct PthFile {
    path: PathBuf,
    zip: Mutex<zip::ZipArchive<BufReader<File>>>,
}

/// The tensors of one or more PyTorch checkpoint files, by name.
pub struct PthStore {
    files: Vec<PthFile>,
    index: HashMap<String, (usize, TensorInfo)>,
}

impl PthStore {
    /// Open `paths` (each a torch zip checkpoint), checking every pickle.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let (zip, infos) = read_infos(path)?;
            for info in infos {
                index.insert(info.name.clone(), (i, info));
            }
            files.push(PthFile {
                path: path.clone(),
                zip: Mutex::new(zip),
            });
        }
        Ok(Self { files, index })
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Whether there is a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name` and its shape, if there is one.
    pub fn shape(&self, name: &str) -> Option<(&Path, &[usize])> {
        self.index
            .get(name)
            .map(|(i, info)| (self.files[*i].path.as_path(), info.layout.dims()))
    }

    /// Read tensor `name` (in its stored dtype) onto `device`.
    pub fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>, ModelError> {
        let Some((i, info)) = self.index.get(name) else {
            return Ok(None);
        };
        let f = &self.files[*i];
        let layout = &info.layout;
        let fortran = layout.is_fortran_contiguous() && !layout.is_contiguous();
        if !layout.is_contiguous() && !fortran {
            return Err(bad(
                &f.path,
                format!("tensor '{name}' is stored with strides {:?}; only contiguous tensors are read — re-save the state dict with contiguous tensors", layout.stride()),
            ));
        }
        let mut zip = f
            .zip
            .lock()
            .map_err(|_| bad(&f.path, "reader poisoned by an earlier panic"))?;
        let mut entry = zip.by_name(&info.path).map_err(|e| {
            bad(
                &f.path,
                format!("tensor '{name}': entry {}: {e}", info.path),
            )
        })?;
        let start = layout.start_offset() as u64;
        if start > 0 {
            std::io::copy(&mut entry.by_ref().take(start), &mut std::io::sink())
                .map_err(ModelError::io(&f.path))?;
        }
        let dims = layout.dims().to_vec();
        let shape: Vec<usize> = if fortran {
            dims.iter().rev().copied().collect()
        } else {
            dims.clone()
        };
        let n: usize = shape.iter().product::<usize>() * info.dtype.size_in_bytes();
        let mut bytes = vec![0u8; n];
        entry.read_exact(&mut bytes).map_err(|e| {
            bad(
                &f.path,
                format!(
                    "tensor '{name}': entry {} is shorter than its {n} bytes ({e})",
                    info.path
                ),
            )
        })?;
        let t = Tensor::from_raw_buffer(&bytes, info.dtype, &shape, &Device::Cpu)
            .map_err(|e| bad(&f.path, format!("tensor '{name}': {e}")))?;
        drop(bytes);
        let t = if fortran && dims.len() > 1 {
            let rev: Vec<usize> = (0..dims.len()).rev().collect();
            t.permute(rev).map_err(ModelError::candle(&f.path))?
        } else {
            t
        };
        t.to_device(device)
            .map(Some)
            .map_err(ModelError::candle(&f.path))
    }
}

/// Open `path`'s zip, parse its `data.pkl` with candle's reader, refuse forbidden globals
/// and collect the tensor descriptions.
fn read_infos(
    path: &Path,
) -> Result<(zip::ZipArchive<BufReader<File>>, Vec<TensorInfo>), ModelError> {
    let file = File::open(path).map_err(ModelError::io(path))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        bad(
            path,
            format!("not a zip archive ({e}); only torch's zip checkpoint format (torch ≥ 1.6) is read — re-save it with torch.save, or convert it to safetensors"),
        )
    })?;
    let pkl: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    let [pkl] = pkl.as_slice() else {
        return Err(bad(
            path,
            format!(
                "expected one <prefix>/data.pkl in the archive, found {}",
                pkl.len()
            ),
        ));
    };
    let dir = pkl.trim_end_matches(".pkl").to_string();
    let obj = {
        let entry = zip.by_name(pkl).map_err(|e| bad(path, e))?;
        let mut r = BufReader::new(entry);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut r)
            .and_then(|_| stack.finalize())
            .map_err(|e| bad(path, format!("{pkl}: unreadable pickle ({e})")))?
    };
    if let Some(g) = forbidden_global(&obj) {
        return Err(ModelError::UnsafePickle {
            path: path.to_path_buf(),
            global: g,
        });
    }
    // A state dict, possibly wrapped (`{"state_dict": {...}}` is not what transformers
    // writes; refuse it rather than guess).
    let Object::Dict(entries) = obj else {
        return Err(bad(
            path,
            format!("{pkl} does not hold a state dict (a dict of tensors)"),
        ));
    };
    let mut infos = Vec::new();
    for (k, v) in entries {
        let key = match &k {
            Object::Unicode(s) => s.clone(),
            _ => continue,
        };
        match v.into_tensor_info(k, Path::new(&dir)) {
            Ok(Some(info)) => infos.push(info),
            Ok(None) => tracing::debug!(file = %path.display(), key, "not a tensor; skipped"),
            Err(e) => tracing::debug!(file = %path.display(), key, "skipped: {e}"),
        }
    }
    if infos.is_empty() {
        return Err(bad(path, format!("{pkl} holds no tensors")));
    }
    Ok((zip, infos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tensor_globals_pass() {
        let class = |m: &str, c: &str| Object::Class {
            module_name: m.into(),
            class_name: c.into(),
        };
        let tensor = Object::Reduce {
            callable: Box::new(class("torch._utils", "_rebuild_tensor_v2")),
            args: Box::new(Object::Tuple(vec![Object::PersistentLoad(Box::new(
                Object::Tuple(vec![
                    Object::Unicode("storage".into()),
                    class("torch", "FloatStorage"),
                ]),
            ))])),
        };
        let ok = Object::Dict(vec![(Object::Unicode("w".into()), tensor.clone())]);
        assert_eq!(forbidden_global(&ok), None);
        let evil = Object::Dict(vec![
            (Object::Unicode("w".into()), tensor),
            (
                Object::Unicode("x".into()),
                Object::Reduce {
                    callable: Box::new(class("posix", "system")),
                    args: Box::new(Object::Tuple(vec![Object::Unicode("true".into())])),
                },
            ),
        ]);
        assert_eq!(forbidden_global(&evil).as_deref(), Some("posix.system"));
    }
}
