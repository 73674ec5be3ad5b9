//! Running a call once its tensors are described: the unsafe hand-over to
//! the core (with its checks), registration among the calls in flight, then
//! the kernel with the GIL released. Shared by every entry point.

use crate::tensors::FirstOperand;
use crate::{core_error, or_fallback, slots};
use oxoptim_core::{
    self as core, inflight, DisjointMemo, Exec, Footprint, RawTensor, StepCounters, TensorBatch,
};
use pyo3::prelude::*;
use std::sync::Arc;

/// Runs `kernel` on `batch` with the GIL released. The call is first
/// registered in flight with what it writes (`written`, one flag per array of
/// a slot, and the `counters`), so that a call on another thread touching the
/// same memory is refused before anything is written, and vice versa.
///
/// The caller keeps every described tensor alive (a [`crate::tensors::KeepAlive`])
/// until this returns.
pub(crate) fn run_in_flight<R: Send>(
    py: Python<'_>,
    batch: TensorBatch,
    written: &[bool],
    counters: Option<StepCounters>,
    kernel: impl FnOnce(&TensorBatch, Option<&StepCounters>) -> core::Result<R> + Send,
) -> PyResult<R> {
    let batch = Arc::new(batch);
    let counters = counters.map(Arc::new);
    let mut footprint = Footprint::new(&batch, written).map_err(core_error)?;
    if let Some(c) = &counters {
        footprint = footprint.with_counters(c);
    }
    let _in_flight = inflight::enter(footprint).map_err(core_error)?;
    py.detach(|| kernel(&batch, counters.as_deref()))
        .map_err(core_error)
}

/// The tensor torch's first op of an SGD step reads as operand `a`: the
/// gradient under weight decay (`grad.add(param, alpha=wd)`), else the parameter.
pub(crate) fn sgd_first_operand(config: &core::SgdConfig) -> FirstOperand {
    if config.weight_decay != 0.0 {
        FirstOperand::Grad
    } else {
        FirstOperand::Param
    }
}

/// As [`sgd_first_operand`] for Adam, where only coupled weight decay reads
/// the gradient first (AdamW decays the parameter, then `exp_avg.lerp_(grad)`).
pub(crate) fn adam_first_operand(config: &core::AdamConfig) -> FirstOperand {
    if config.weight_decay != 0.0 && !config.decoupled_weight_decay {
        FirstOperand::Grad
    } else {
        FirstOperand::Param
    }
}

/// SGD writes the parameter and the momentum buffer, and reads the gradient.
const SGD_WRITES: [bool; 3] = [true, false, true];
/// Adam writes the parameter and every state array, and reads the gradient.
const ADAM_WRITES: [bool; 5] = [true, false, true, true, true];

/// SGD over `[param, grad(, momentum_buffer)]` columns. False: torch must run
/// it (tensors share memory or mix dtypes).
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
    let written = &SGD_WRITES[..config.arity()];
    run_in_flight(py, batch, written, None, |batch, _| {
        core::sgd_step(config, batch, fresh, exec)
    })?;
    Ok(true)
}

/// Adam over `[param, grad, exp_avg, exp_avg_sq(, max_exp_avg_sq)]` columns,
/// incrementing the `steps` counters once everything is validated. False:
/// torch must run it.
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
    let written = &ADAM_WRITES[..config.arity()];
    run_in_flight(py, batch, written, Some(counters), |batch, counters| {
        let counters = counters.expect("registered above");
        core::adam_step_counted(config, batch, counters, exec)
    })?;
    Ok(true)
}
