//! Hookpoints and the hook protocol of our hookable forward passes.
//!
//! Implements `../shared/specs/pipeline.md` §3. Names follow TransformerLens/SAELens:
//! `blocks.{L}.hook_{site}`, L counted from 0. Candle has no forward hooks (candle#2774),
//! so every model's forward pass reports its sites itself through [`Hooks`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

/// A site inside one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// Input of the block.
    ResidPre,
    /// Attention output after the output projection, before the residual add.
    AttnOut,
    /// `resid_pre + attn_out`.
    ResidMid,
    /// Input of the MLP: its pre-MLP norm applied to what the MLP reads.
    MlpIn,
    /// MLP output before the residual add.
    MlpOut,
    /// Output of the block.
    ResidPost,
}

impl Site {
    /// Every site, in the order a forward pass reaches them.
    pub const ALL: [Site; 6] = [
        Site::ResidPre,
        Site::AttnOut,
        Site::ResidMid,
        Site::MlpIn,
        Site::MlpOut,
        Site::ResidPost,
    ];

    /// The name used after `hook_` in a hookpoint.
    pub fn name(self) -> &'static str {
        match self {
            Site::ResidPre => "resid_pre",
            Site::AttnOut => "attn_out",
            Site::ResidMid => "resid_mid",
            Site::MlpIn => "mlp_in",
            Site::MlpOut => "mlp_out",
            Site::ResidPost => "resid_post",
        }
    }
}

impl FromStr for Site {
    type Err = HookpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Site::ALL
            .into_iter()
            .find(|site| site.name() == s)
            .ok_or_else(|| HookpointError::UnknownSite(s.to_string()))
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A named place in the model: `blocks.{layer}.hook_{site}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hookpoint {
    /// Block index, from 0.
    pub layer: usize,
    /// Site inside the block.
    pub site: Site,
}

impl Hookpoint {
    /// A hookpoint at `site` of block `layer`.
    pub fn new(layer: usize, site: Site) -> Self {
        Self { layer, site }
    }
}

/// Why a hookpoint name could not be parsed or is not available in a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookpointError {
    #[error(
        "'{0}' is not a hookpoint name; expected blocks.<layer>.hook_<site>, \
         e.g. blocks.3.hook_mlp_out"
    )]
    Malformed(String),
    #[error(
        "unknown hook site '{0}'; the sites are resid_pre, attn_out, resid_mid, mlp_in, \
         mlp_out, resid_post"
    )]
    UnknownSite(String),
    #[error("hookpoint {hookpoint}: layer {layer} is out of range; this model has {n_layers} layers, so use a layer in 0..={max}", max = n_layers.saturating_sub(1))]
    LayerOutOfRange {
        hookpoint: String,
        layer: usize,
        n_layers: usize,
    },
    #[error("hookpoint {hookpoint}: site {site} is not available for {model_type}; use one of: {available}")]
    SiteUnavailable {
        hookpoint: String,
        site: String,
        model_type: String,
        /// The sites this model does expose, comma-separated.
        available: String,
    },
}

impl FromStr for Hookpoint {
    type Err = HookpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || HookpointError::Malformed(s.to_string());
        let rest = s.strip_prefix("blocks.").ok_or_else(malformed)?;
        let (layer, site) = rest.split_once('.').ok_or_else(malformed)?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let layer: usize = layer.parse().map_err(|_| malformed())?;
        let site = site.strip_prefix("hook_").ok_or_else(malformed)?;
        Ok(Hookpoint::new(layer, site.parse()?))
    }
}

impl fmt::Display for Hookpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocks.{}.hook_{}", self.layer, self.site)
    }
}

impl serde::Serialize for Hookpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Hookpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a forward pass calls at every hook site.
///
/// The model calls [`Hooks::wants`] first and only materialises and visits the sites
/// that are wanted, so an empty hook set costs nothing.
pub trait Hooks {
    /// Whether this hookpoint should be visited.
    fn wants(&self, hp: Hookpoint) -> bool;
    /// Look at the activation `x` of shape `(batch, seq, d_model)`. Return `Some(t)` (same
    /// shape) to replace it for the rest of the forward pass (splicing an SAE into the
    /// model), or `None` to observe only.
    fn visit(&mut self, hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>>;
}

/// No hooks: a plain forward pass.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn wants(&self, _hp: Hookpoint) -> bool {
        false
    }
    fn visit(&mut self, _hp: Hookpoint, _x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Records a copy of every requested hookpoint's activation.
#[derive(Default)]
pub struct Recorder {
    wanted: Vec<Hookpoint>,
    /// The recorded activations, `(batch, seq, d_model)` each.
    pub acts: BTreeMap<Hookpoint, Tensor>,
}

impl Recorder {
    /// Record these hookpoints.
    pub fn new(wanted: impl IntoIterator<Item = Hookpoint>) -> Self {
        Self {
            wanted: wanted.into_iter().collect(),
            acts: BTreeMap::new(),
        }
    }

    /// The deepest layer any recorded hookpoint needs: where the forward pass may stop.
    pub fn deepest_layer(&self) -> Option<usize> {
        self.wanted.iter().map(|hp| hp.layer).max()
    }
}

impl Hooks for Recorder {
    fn wants(&self, hp: Hookpoint) -> bool {
        self.wanted.contains(&hp)
    }
    fn visit(&mut self, hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.acts.insert(hp, x.clone());
        Ok(None)
    }
}

/// Replaces one hookpoint's activation with `f(x)` (e.g. an SAE's reconstruction) and
/// optionally records other hookpoints.
pub struct Replace<F> {
    /// The hookpoint to replace.
    pub target: Hookpoint,
    /// The replacement, given the clean activation `(batch, seq, d_model)`.
    pub f: F,
}

impl<F> Hooks for Replace<F>
where
    F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
{
    fn wants(&self, hp: Hookpoint) -> bool {
        hp == self.target
    }
    fn visit(&mut self, hp: Hookpoint, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if hp == self.target {
            Ok(Some((self.f)(x)?))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_saelens_names() {
        let hp: Hookpoint = "blocks.3.hook_mlp_out".parse().unwrap();
        assert_eq!(hp, Hookpoint::new(3, Site::MlpOut));
        assert_eq!(hp.to_string(), "blocks.3.hook_mlp_out");
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "blocks.x.hook_mlp_out",
            "block.3.hook_mlp_out",
            "blocks.3.mlp_out",
            "blocks..hook_mlp_out",
            "blocks.-1.hook_mlp_out",
        ] {
            assert!(
                matches!(bad.parse::<Hookpoint>(), Err(HookpointError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "blocks.1.hook_mlp_mid".parse::<Hookpoint>(),
            Err(HookpointError::UnknownSite(_))
        ));
    }

    proptest! {
        #[test]
        fn display_fromstr_roundtrip(layer in 0usize..10_000, site in 0usize..6) {
            let hp = Hookpoint::new(layer, Site::ALL[site]);
            prop_assert_eq!(hp.to_string().parse::<Hookpoint>().unwrap(), hp);
        }
    }
}
