//! oxoptim-core: SIMD optimizer updates with runtime CPU dispatch.
//!
//! Pure Rust, no Python: callers describe tensor memory as [`RawTensor`]s,
//! [`TensorBatch::new`] checks them (the only unsafe boundary), and a kernel
//! such as [`sgd_step`] or [`adam_step`] updates every tensor of a parameter
//! group in one call, split across threads by elements. [`OPTIMIZERS`] is the
//! table of torch twins the bindings are generated from.

pub mod dispatch;
pub mod engine;
pub mod error;
pub mod inflight;
pub mod kernels;
pub mod optimizer;
pub mod quant;
mod quant_bytes;
pub mod reduce;
pub mod rounding;
pub mod simd;
pub mod storage;
pub mod tensors;

pub use dispatch::Backend;
pub use engine::{set_parallel_for, Exec, ParallelFor};
pub use error::{Error, Result};
pub use inflight::{Footprint, InFlight};
pub use kernels::adam::{adam_step, AdamConfig};
pub use kernels::averaging::{accumulate_mean, lerp_average, scale_into};
pub use kernels::prodigy::{prodigy_sums, ProdigySums};
pub use kernels::sgd::{sgd_step, SgdConfig};
pub use kernels::stream_probe::stream_probe;
pub use kernels::subgradient::{subgradient_step, SubgradientConfig};
pub use kernels::OPTIMIZERS;
pub use optimizer::{Configured, Entry, Hyper, HyperKind, HyperValue, Optimizer};
pub use reduce::{any_nonfinite, norm, reduce, torch_norm, Reduction};
pub use rounding::ParamRounding;
pub use tensors::{
    ArraySpec, Column, DType, DisjointMemo, Extent, RawTensor, ScalarState, TensorBatch,
};
