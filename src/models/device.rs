//! Where and in what precision a model runs: `cpu` / `cuda` / `cuda:N` and f32 / bf16 / f16.
//!
//! Implements `[model] device` and `dtype` of `../shared/specs/pipeline.md` §2 (issue 13).
//! [`DeviceSpec`] parses the value, [`DeviceSpec::check_build`] is the static check the
//! config runs at load (is this binary built with the `cuda` feature?), and
//! [`DeviceSpec::open`] creates the candle device, failing when the GPU is absent. Both
//! errors name the key they were given and the two fixes.
//!
//! Decision: the GPU itself is only touched by [`DeviceSpec::open`], not at config load, so
//! `saepipe validate` / `saepipe slurm` on a login node without a GPU still work; the
//! pipeline opens the device before it resolves (and possibly downloads) the model.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// A device a model can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA GPU number `N` (`cuda` = `cuda:0`); needs the `cuda` cargo feature.
    Cuda(usize),
}

/// Why a device could not be used. `key` is what the user wrote it in (`model.device`,
/// `--device`), so the message points at the right place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("{key} = \"{value}\": not a device; use \"cpu\", \"cuda\" or \"cuda:N\" (N = the GPU's number, 0 first)")]
    Malformed {
        /// Where the value was given.
        key: String,
        /// The value.
        value: String,
    },
    /// This binary has no CUDA support compiled in.
    #[error("{key} = \"{device}\": this saepipe was built without CUDA support; rebuild it with `cargo build --release --features cuda` (needs the CUDA toolkit), or set {key} = \"cpu\"")]
    NotBuilt {
        /// Where the value was given.
        key: String,
        /// The device asked for.
        device: DeviceSpec,
    },
    /// Built with CUDA, but the GPU could not be opened (no GPU, no driver, wrong number).
    #[error("{key} = \"{device}\": cannot open the GPU ({detail}); run on a machine with an NVIDIA GPU and driver (check `nvidia-smi` and CUDA_VISIBLE_DEVICES), or set {key} = \"cpu\"")]
    Unavailable {
        /// Where the value was given.
        key: String,
        /// The device asked for.
        device: DeviceSpec,
        /// candle's error.
        detail: String,
    },
}

impl DeviceSpec {
    /// Parse `cpu`, `cuda` or `cuda:N`, naming `key` in the error.
    pub fn parse_for(key: &str, s: &str) -> Result<Self, DeviceError> {
        let bad = || DeviceError::Malformed {
            key: key.to_string(),
            value: s.to_string(),
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }

    /// Whether this device is a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// The static check: a CUDA device in a binary built without the `cuda` feature is
    /// refused. Touches no GPU.
    pub fn check_build(self, key: &str) -> Result<(), DeviceError> {
        if self.is_cuda() && !candle_core::utils::cuda_is_available() {
            return Err(DeviceError::NotBuilt {
                key: key.to_string(),
                device: self,
            });
        }
        Ok(())
    }

    /// Create the candle device (a CUDA context for `cuda:N`).
    pub fn open(self, key: &str) -> Result<Device, DeviceError> {
        self.check_build(key)?;
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| DeviceError::Unavailable {
                key: key.to_string(),
                device: self,
                detail: e.to_string(),
            }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(0) => f.write_str("cuda"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_for("device", s)
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "\"{s}\" is not a device; use \"cpu\", \"cuda\" or \"cuda:N\""
            ))
        })
    }
}

/// Parse a model dtype name (`f32`, `bf16`, `f16`, and the long spellings), for flags.
pub fn parse_model_dtype(s: &str) -> Option<DType> {
    match s {
        "f32" | "float32" => Some(DType::F32),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "float16" => Some(DType::F16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in [
            "gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:1:2", " cpu",
        ] {
            let e = DeviceSpec::parse_for("model.device", bad).unwrap_err();
            assert!(e.to_string().starts_with("model.device = "), "{e}");
            assert!(e.to_string().contains("\"cuda:N\""), "{e}");
        }
        for d in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            assert_eq!(d.to_string().parse::<DeviceSpec>().unwrap(), d);
        }
    }

    #[test]
    fn cuda_needs_the_feature_or_a_gpu() {
        assert!(DeviceSpec::Cpu.open("k").unwrap().is_cpu());
        let e = DeviceSpec::Cuda(0).check_build("model.device");
        if cfg!(feature = "cuda") {
            assert!(e.is_ok());
        } else {
            let msg = e.unwrap_err().to_string();
            assert!(msg.contains("model.device = \"cuda\""), "{msg}");
            assert!(msg.contains("--features cuda"), "{msg}");
            assert!(msg.contains("model.device = \"cpu\""), "{msg}");
        }
        // Whatever the build, a GPU number no machine has is a clear error, not a panic.
        if let Err(e) = DeviceSpec::Cuda(999).open("--device") {
            let msg = e.to_string();
            assert!(msg.contains("--device = \"cuda:999\""), "{msg}");
            assert!(msg.contains("--device = \"cpu\""), "{msg}");
        }
    }

    #[test]
    fn dtype_names() {
        assert_eq!(parse_model_dtype("bf16"), Some(DType::BF16));
        assert_eq!(parse_model_dtype("float16"), Some(DType::F16));
        assert_eq!(parse_model_dtype("f32"), Some(DType::F32));
        assert_eq!(parse_model_dtype("f64"), None);
    }
}
