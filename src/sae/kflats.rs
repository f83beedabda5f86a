//! k-flats (`jsae_pamsgd.md` §2.4, the "optimal" k-means-esque + local-PCA autoencoder):
//! the one-shot `local_pca` fit followed by `iterations` alternations of assignment by
//! residual to each region's affine subspace and exact refit of its mean and top-r principal
//! components. Monotone non-increasing in MSE when each pass sees the same tokens. The model,
//! its fitting passes, its exact export (the `kmeans` format with `assignment = "residual"`)
//! and its memory cost are documented in `local_pca/`.

use serde::{Deserialize, Serialize};

use super::local_pca::{Flats, ADAM};
use super::{ArchConfig, ArchSpec, Sae, SaeError, Variant};
use crate::util::rng::Rng;

/// Variant name of the k-flats autoencoder.
pub const ARCH: &str = "kflats";

/// `kflats` hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Dimensions of each region's subspace (L0 = 1 + rank); regions K = ⌊d_sae/(1+rank)⌋.
    /// Default 8.
    pub rank: usize,
    /// Residual reassignments + refits after the one-shot fit (>= 1). The run's steps are
    /// cut into 2 + iterations equal passes. Default 3.
    pub iterations: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rank: 8,
            iterations: 3,
        }
    }
}

/// The registration of `kflats` (exports in the `kmeans` format of `kmeans/`).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || {
        Config {
            rank: 2,
            iterations: 1,
        }
        .into()
    },
    formats: &[],
};

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        if self.iterations == 0 {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: "iterations must be >= 1 (the one-shot fit is kind = \"local_pca\")".into(),
            });
        }
        let cfg: ArchConfig = self.clone().into();
        Ok(Box::new(Flats::new(
            ARCH,
            cfg,
            self.rank,
            self.iterations,
            d,
            f,
            rng,
        )?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        Config {
            rank: super::registry::divide_k(self.rank, factor),
            iterations: self.iterations,
        }
        .into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("rank", self.rank as f64)
    }
    fn recommended_adam(&self, _d_sae: usize, _steps: u64) -> (f32, f32, f32) {
        ADAM
    }
    fn supports_tensor(&self) -> bool {
        true
    }
}
