//! Rust core of ka_rs. Pure Rust: nothing here knows about Python except `python.rs`,
//! which is compiled only with the `python` feature (enabled by maturin).
//!
//! - [`alloc`]   fallible allocation of every input-sized buffer (errors, never aborts)
//! - [`boxes`]   box formats, IoU, GIoU, NMS
//! - [`lsap`]    rectangular linear sum assignment (shortest augmenting path, Crouse 2016)
//! - [`cost`]    DETR matching costs for one image (softmax or focal class cost, L1, GIoU)
//! - [`matcher`] many images × many prediction sets in one call, ragged, parallel
//! - [`targets`] union label space, candidate selection, soft-target remap (KA)
//! - [`pool`]    process-local rayon pool that survives `fork`

pub mod alloc;
pub mod boxes;
pub mod cost;
pub mod error;
pub mod lsap;
pub mod matcher;
pub mod pool;
pub mod targets;

#[cfg(feature = "python")]
mod python;

pub use error::{KaError, KaResult};
