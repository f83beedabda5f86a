//! Opt-in wall-clock timers per phase of a training step, for
//! `saepipe bench train --breakdown`: the kernels and the trainer wrap each phase in
//! [`time`]; nothing is recorded unless [`enable`] was called, and then each timer costs
//! two `Instant::now()` calls.
//!
//! Timers are taken on the calling thread around whole (internally parallel) kernels, so a
//! phase's total is its wall time, and the phases of one step add up to at most the step.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A phase of a CPU training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The dense encoder GEMM `x̃ W_encᵀ + b_enc`.
    EncoderGemm,
    /// Per-token selection of the active latents from the pre-activations (top-k, AuxK,
    /// thresholds) and collecting the codes.
    Selection,
    /// Sparse decode `x̂ = z W_dec + b_dec` (and the AuxK reconstruction).
    Decode,
    /// Backward: the per-entry dot products `d_i·g_b` (the gradient of each active code).
    Dots,
    /// Backward: the sparse outer-product accumulations into the `W_enc`/`W_dec` gradients.
    Accumulate,
    /// Backward, the rest: zeroing the gradients, the residual, the bias gradients.
    Backward,
    /// Unit-norm projection, clipping, the optimiser update and its constraints.
    Optimizer,
}

impl Phase {
    /// Every phase, in step order.
    pub const ALL: [Phase; 7] = [
        Phase::EncoderGemm,
        Phase::Selection,
        Phase::Decode,
        Phase::Dots,
        Phase::Accumulate,
        Phase::Backward,
        Phase::Optimizer,
    ];

    /// Name in the breakdown table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::EncoderGemm => "encoder GEMM",
            Phase::Selection => "selection",
            Phase::Decode => "sparse decode",
            Phase::Dots => "bwd: dots",
            Phase::Accumulate => "bwd: accumulate",
            Phase::Backward => "bwd: rest",
            Phase::Optimizer => "optimiser",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

/// Turn recording on or off (off by default).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zero every phase's total.
pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}

/// Seconds recorded per phase since the last [`reset`], in [`Phase::ALL`] order.
pub fn totals() -> [(Phase, f64); 7] {
    Phase::ALL.map(|p| (p, NANOS[p as usize].load(Ordering::Relaxed) as f64 * 1e-9))
}

/// A running timer; adds its elapsed time to its phase when dropped.
#[must_use = "the phase is timed until the guard is dropped"]
pub struct Timer(Option<(Phase, Instant)>);

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((p, t0)) = self.0.take() {
            NANOS[p as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// Time `phase` until the returned guard is dropped (a no-op unless [`enable`]d).
#[inline]
pub fn time(phase: Phase) -> Timer {
    Timer(
        ENABLED
            .load(Ordering::Relaxed)
            .then(|| (phase, Instant::now())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_enabled() {
        // One test touches the global state, so the two halves cannot race each other.
        reset();
        drop(time(Phase::Decode));
        assert_eq!(totals()[2].1, 0.0, "disabled timers record nothing");
        assert_eq!(Phase::ALL.map(|p| p as usize), [0, 1, 2, 3, 4, 5, 6]);
        enable(true);
        {
            let _t = time(Phase::Decode);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        enable(false);
        let t = totals();
        assert!(t[2].1 >= 0.002, "{t:?}");
        assert_eq!(t[0].1, 0.0);
        reset();
        assert_eq!(totals()[2].1, 0.0);
    }
}
