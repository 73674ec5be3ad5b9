//! Running a step once its tensors are described: the unsafe hand-over to
//! the core (with its checks), then the kernel with the GIL released. Shared
//! by the list-based and the whole-group entry points.

use crate::{core_error, or_fallback, slots};
use oxoptim_core::{self as core, DisjointMemo, Exec, RawTensor, StepCounters, TensorBatch};
use pyo3::prelude::*;

/// SGD over `[param, grad(, momentum_buffer)]` columns. False: torch must run it (tensors share memory).
pub(crate) fn run_sgd(
    py: Python<'_>,
    config: &core::SgdConfig,
    columns: &[Vec<RawTensor>],
    fresh: &[bool],
    exec: Exec,
    memo: &mut DisjointMemo,
) -> PyResult<bool> {
    // SAFETY: every column was described from a live, dense, contiguous CPU
    // tensor of a supported dtype, which the caller keeps alive for the call.
    let Some(batch) =
        or_fallback(unsafe { TensorBatch::new_memo(slots(columns), config.arity(), memo) })?
    else {
        return Ok(false);
    };
    py.detach(|| core::sgd_step(config, &batch, fresh, exec))
        .map_err(core_error)?;
    Ok(true)
}

/// Adam over `[param, grad, exp_avg, exp_avg_sq(, max_exp_avg_sq)]` columns,
/// incrementing the `steps` counters first. False: torch must run it.
pub(crate) fn run_adam(
    py: Python<'_>,
    config: &core::AdamConfig,
    columns: &[Vec<RawTensor>],
    steps: Vec<RawTensor>,
    exec: Exec,
    memos: (&mut DisjointMemo, &mut DisjointMemo),
) -> PyResult<bool> {
    // SAFETY: as in `run_sgd`.
    let Some(batch) =
        or_fallback(unsafe { TensorBatch::new_memo(slots(columns), config.arity(), memos.0) })?
    else {
        return Ok(false);
    };
    // SAFETY: the counters were described like the arrays, from live 0-d CPU tensors.
    let Some(counters) = or_fallback(unsafe { StepCounters::new_memo(steps, &batch, memos.1) })?
    else {
        return Ok(false);
    };
    py.detach(|| {
        let steps = counters.increment();
        core::adam_step(config, &batch, &steps, exec)
    })
    .map_err(core_error)?;
    Ok(true)
}
