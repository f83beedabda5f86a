//! Primitives every other module may use and that use nothing of the crate: boolean
//! environment variables ([`env`]), numeric guards ([`error`]), the run-folder lock ([`lock`]), atomic file writes ([`fs`]), the seeded RNG ([`rng`]), the
//! progress-reporting trait ([`progress`]) and opt-in phase timers ([`profile`]).

pub mod env;
pub mod error;
pub mod fs;
pub mod lock;
pub mod profile;
pub mod progress;
pub mod rng;
