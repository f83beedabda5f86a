//! Jacobian sparse autoencoders (JSAE, Farnik et al. 2025): a pair of TopK SAEs on the input
//! (`mlp_in`) and output (`mlp_out`) of one MLP block, trained jointly so that the Jacobian
//! of (input-SAE decoder → MLP → output-SAE encoder) is sparse.
//!
//! Implements `../shared/specs/jsae_pamsgd.md` §1. Pieces:
//! 1. [`crate::models::MlpWeights`]: the block's MLP as f32 matrices (GELU or SwiGLU);
//! 2. [`jacobian`]: the exact active `k×k` block per token and the penalty's gradient;
//! 3. [`pair`]: the pair as a model of the training engine (its loss and hand-written
//!    gradients) and its metrics;
//! 4. [`tensor`]: the same step on candle tensors with autograd (`train.backend =
//!    "tensor"`, any device), the kernels' oracle;
//! 5. `crate::pipeline::jsae`: the `[jsae]` pipeline stage (train JSAE and plain pairs, evaluate, CE with
//!    both SAEs spliced in, rows in `metrics.parquet`).

pub mod jacobian;
pub mod pair;
pub mod tensor;

pub use jacobian::{JacStats, JacTables, THRESHOLDS};
pub use pair::{JacAt, JsaePair, PairConfig, PairError, PairEval};
