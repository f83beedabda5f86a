//! One safetensors file read tensor by tensor with positioned reads, straight into each
//! tensor's own buffer (issue 14 item 3: memory that tracks the weights).
//!
//! Decision: no memory map. candle's `MmapedSafetensors` copies each tensor out of the
//! map, and every page it touched stays resident in the process (file-backed RSS) until
//! the map is dropped, so a loaded f32 model peaked at ~2× its weight bytes. Here the
//! header is parsed once (the `safetensors` crate's own `Metadata`, with its offset
//! checks) and each tensor is `pread` into a `Vec` of its element type that becomes the
//! candle tensor without another copy (CPU). The page cache still holds the file, but
//! the kernel can drop those pages; they are not the process's memory.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use super::error::ModelError;

/// The tensors of one safetensors file, by name.
pub struct StFile {
    path: PathBuf,
    file: File,
    /// Absolute byte offset of the data section.
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl StFile {
    /// Open `path` and read its header.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |detail: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            detail,
        };
        let file = File::open(path).map_err(ModelError::io(path))?;
        let len = file.metadata().map_err(ModelError::io(path))?.len();
        let mut n8 = [0u8; 8];
        file.read_exact_at(&mut n8, 0)
            .map_err(|e| bad(format!("no header length: {e}")))?;
        let n = u64::from_le_bytes(n8);
        // The crate's own limit (100 MB) for a header.
        if n > 100_000_000 || 8 + n > len {
            return Err(bad(format!(
                "header length {n} does not fit the file of {len} bytes"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(format!("reading the header: {e}")))?;
        let meta: Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
        if 8 + n + meta.data_len() as u64 != len {
            return Err(bad(format!(
                "the header describes {} data bytes but the file has {} (truncated or padded)",
                meta.data_len(),
                len - 8 - n
            )));
        }
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            tensors,
        })
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The shape of tensor `name`, if there is one.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Read tensor `name` in its stored dtype onto `device` (`None` if absent). Only the
    /// float types models use are read (f32, f16, bf16, f64).
    pub fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>, ModelError> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let shape = info.shape.as_slice();
        let n: usize = shape.iter().product();
        let t = match info.dtype {
            Dtype::F32 => Tensor::from_vec(self.read::<f32>(name, info, n)?, shape, device),
            // `half`'s types are not `bytemuck::Pod` here: read the bits, then convert
            // (a transient copy of this one tensor).
            Dtype::F16 => {
                let bits = self.read::<u16>(name, info, n)?;
                let v: Vec<half::f16> = bits.into_iter().map(half::f16::from_bits).collect();
                Tensor::from_vec(v, shape, device)
            }
            Dtype::BF16 => {
                let bits = self.read::<u16>(name, info, n)?;
                let v: Vec<half::bf16> = bits.into_iter().map(half::bf16::from_bits).collect();
                Tensor::from_vec(v, shape, device)
            }
            Dtype::F64 => Tensor::from_vec(self.read::<f64>(name, info, n)?, shape, device),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        t.map(Some).map_err(ModelError::candle(&self.path))
    }

    /// `n` little-endian values of tensor `name`, read straight into their `Vec`.
    fn read<T: bytemuck::Pod + Default>(
        &self,
        name: &str,
        info: &TensorInfo,
        n: usize,
    ) -> Result<Vec<T>, ModelError> {
        let (s, e) = info.data_offsets;
        let mut v = vec![T::default(); n];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
        if bytes.len() != e - s {
            return Err(ModelError::Safetensors {
                path: self.path.clone(),
                detail: format!(
                    "tensor '{name}': {} bytes for {n} values",
                    e.saturating_sub(s)
                ),
            });
        }
        self.file
            .read_exact_at(bytes, self.data_start + s as u64)
            .map_err(|err| ModelError::Safetensors {
                path: self.path.clone(),
                detail: format!("tensor '{name}': {err}"),
            })?;
        if cfg!(target_endian = "big") {
            // safetensors is little-endian: swap each value's bytes in place.
            let w = std::mem::size_of::<T>();
            bytemuck::cast_slice_mut::<T, u8>(&mut v)
                .chunks_exact_mut(w)
                .for_each(|c| c.reverse());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_candle_wrote_in_every_float_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let mut map = HashMap::new();
        for dt in [
            candle_core::DType::F32,
            candle_core::DType::F16,
            candle_core::DType::BF16,
            candle_core::DType::F64,
        ] {
            map.insert(format!("{dt:?}"), a.to_dtype(dt).unwrap());
        }
        map.insert(
            "ints".to_string(),
            a.to_dtype(candle_core::DType::U32).unwrap(),
        );
        candle_core::safetensors::save(&map, &path).unwrap();
        let f = StFile::open(&path).unwrap();
        for name in ["F32", "F16", "BF16", "F64"] {
            let t = f.load(name, &Device::Cpu).unwrap().unwrap();
            assert_eq!(t.dims(), &[2, 3]);
            let back: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(back, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "{name}");
        }
        assert!(f.load("nope", &Device::Cpu).unwrap().is_none());
        let e = f.load("ints", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("ints"), "{e}");
    }

    #[test]
    fn a_truncated_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a)]), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = StFile::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
}
