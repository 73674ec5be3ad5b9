//! Bindings for the subgradient method, gradient/parameter averaging and the
//! deterministic reductions (norms, any-non-finite). Same conventions as the
//! optimizer steps: tensors are checked and described here (and held until
//! the call returns), kernels run registered in flight with the GIL
//! released, and `False`/`None` means "some tensor needs torch". Reductions
//! only read, so they accept a tensor listed twice; a call that writes hands
//! tensors sharing memory to torch, which updates them one after another.

use crate::tensors::{column, param_and_grad_columns, FirstOperand, KeepAlive};
use crate::{bump_versions, exec, or_fallback, run_in_flight, slots};
use oxoptim_core::{self as core, RawTensor, TensorBatch};
use pyo3::prelude::*;
use pyo3::types::PyList;

/// Describes the role lists (equal lengths) as columns, or `None` when some
/// tensor needs torch; `written[k]`: the call writes role `k`'s tensors.
fn columns_of<'py>(
    lists: &[(&Bound<'py, PyList>, &str)],
    written: &[bool],
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<Vec<Vec<RawTensor>>>> {
    let n = lists.first().map_or(0, |(l, _)| l.len());
    let mut columns = Vec::with_capacity(lists.len());
    for ((list, role), &written) in lists.iter().zip(written) {
        match column(list, n, role, written, keep)? {
            Some(c) => columns.push(c),
            None => return Ok(None),
        }
    }
    Ok(Some(columns))
}

/// A batch the kernel writes, or `None` (torch's path) when its tensors share
/// memory or a slot mixes dtypes.
fn writable(columns: &[Vec<RawTensor>]) -> PyResult<Option<TensorBatch>> {
    // SAFETY: every column was described from a live, dense, contiguous CPU
    // tensor of a supported dtype, which the caller holds until the call returns.
    or_fallback(unsafe { TensorBatch::new(slots(columns), columns.len()) })
}

/// A batch the kernel only reads (overlaps allowed), or `None` when a slot mixes dtypes.
fn read_only(columns: &[Vec<RawTensor>]) -> PyResult<Option<TensorBatch>> {
    // SAFETY: as in `writable`; the batch is only read.
    or_fallback(unsafe { TensorBatch::new_read_only(slots(columns), columns.len()) })
}

/// The operand order of torch's ops on the subgradient direction (see
/// `subgradient.py`): the gradient comes first when a decay or L1 term is
/// added to it, else `param.add_(direction)` does.
fn subgradient_first_operand(l1: f64, weight_decay: f64) -> FirstOperand {
    if l1 != 0.0 || weight_decay != 0.0 {
        FirstOperand::Grad
    } else {
        FirstOperand::Param
    }
}

/// θ ← θ − step·(±g + l1·sign(θ) + weight_decay·θ) over a parameter group.
#[pyfunction]
#[pyo3(signature = (params, grads, *, step, l1, weight_decay, maximize, num_threads=1, backend=None))]
#[allow(clippy::too_many_arguments)]
fn subgradient_step(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    step: f64,
    l1: f64,
    weight_decay: f64,
    maximize: bool,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let config = core::SubgradientConfig {
        step,
        l1,
        weight_decay,
        maximize,
    };
    let exec = exec(num_threads, backend)?;
    let mut keep = KeepAlive::with_capacity(2 * params.len());
    let first = subgradient_first_operand(l1, weight_decay);
    let Some(columns) = param_and_grad_columns(params, grads, first, true, &mut keep)? else {
        return Ok(false);
    };
    let Some(batch) = writable(&columns)? else {
        return Ok(false);
    };
    run_in_flight(py, batch, &[true, false], |b| {
        core::subgradient_step(&config, b, exec)
    })?;
    bump_versions(py, &[params])?;
    Ok(true)
}

/// ‖±g + l1·sign(θ) + weight_decay·θ‖² over a group (the subgradient step's direction).
#[pyfunction]
#[pyo3(signature = (params, grads, *, l1, weight_decay, maximize, num_threads=1, backend=None))]
#[allow(clippy::too_many_arguments)]
fn direction_sq_norm(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    l1: f64,
    weight_decay: f64,
    maximize: bool,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<Option<f64>> {
    let r = core::Reduction::DirectionSquares {
        l1,
        weight_decay,
        maximize,
    };
    let exec = exec(num_threads, backend)?;
    let mut keep = KeepAlive::with_capacity(2 * params.len());
    let first = subgradient_first_operand(l1, weight_decay);
    let Some(columns) = param_and_grad_columns(params, grads, first, false, &mut keep)? else {
        return Ok(None);
    };
    let Some(batch) = read_only(&columns)? else {
        return Ok(None);
    };
    run_in_flight(py, batch, &[false, false], |b| core::reduce(r, b, exec)).map(Some)
}

/// Prodigy's reduction pass over a group: each tensor's `(dot(g, p0 − p),
/// Σ|β3·s + s_weight·g|)` (see `oxoptim_core::prodigy_sums`), before any
/// write. `p0=None`: every origin is the reference's 0-d zero. `None` when
/// some tensor needs torch.
#[pyfunction]
#[pyo3(signature = (params, grads, s, p0, *, weight_decay, beta3, s_weight, num_threads=1, backend=None))]
#[allow(clippy::too_many_arguments)]
fn prodigy_sums(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    s: &Bound<'_, PyList>,
    p0: Option<&Bound<'_, PyList>>,
    weight_decay: f64,
    beta3: f64,
    s_weight: f64,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<Option<Vec<(f64, f64)>>> {
    let config = core::ProdigySums {
        weight_decay,
        beta3,
        s_weight,
    };
    let exec = exec(num_threads, backend)?;
    let mut keep = KeepAlive::with_capacity(4 * params.len());
    let Some(mut columns) = param_and_grad_columns(params, grads, FirstOperand::Grad, false, &mut keep)?
    else {
        return Ok(None);
    };
    let mut lists = vec![(s, "s")];
    lists.extend(p0.map(|p0| (p0, "p0")));
    if let Some((list, role)) = lists.iter().find(|(l, _)| l.len() != params.len()) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "expected {} {role} tensors, got {}",
            params.len(),
            list.len()
        )));
    }
    let Some(state) = columns_of(&lists, &[false, false], &mut keep)? else {
        return Ok(None);
    };
    columns.extend(state);
    let Some(batch) = read_only(&columns)? else {
        return Ok(None);
    };
    let float = |d: core::DType| {
        use core::DType::*;
        matches!(d, F32 | F64 | BF16 | F16) // half precision summed in float32
    };
    if !(0..batch.slots()).all(|i| float(batch.slot(i).dtype)) {
        return Ok(None); // the reference's torch ops
    }
    let reads = vec![false; columns.len()];
    run_in_flight(py, batch, &reads, |b| core::prodigy_sums(&config, b, exec)).map(Some)
}

/// Runs `f` on a read-only batch of `tensors`; `None` when torch must do it.
fn reduce_one<R: Send>(
    py: Python<'_>,
    tensors: &Bound<'_, PyList>,
    f: impl FnOnce(&TensorBatch) -> core::Result<R> + Send,
) -> PyResult<Option<R>> {
    let mut keep = KeepAlive::with_capacity(tensors.len());
    let Some(columns) = columns_of(&[(tensors, "tensor")], &[false], &mut keep)? else {
        return Ok(None);
    };
    let Some(batch) = read_only(&columns)? else {
        return Ok(None);
    };
    run_in_flight(py, batch, &[false], |b| f(b)).map(Some)
}

/// The p-norm (1, 2, inf or finite p > 0) of all tensors as one vector,
/// deterministic whatever the thread count; `None` when torch must do it.
/// `as_torch`: where torch's `clip_grad_norm_` would leave the range of the
/// dtype it reduces in, its result (`core::torch_norm`; tensors of one dtype).
#[pyfunction]
#[pyo3(signature = (tensors, norm_type, *, as_torch=false, num_threads=1, backend=None))]
fn tensor_norm(
    py: Python<'_>,
    tensors: &Bound<'_, PyList>,
    norm_type: f64,
    as_torch: bool,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<Option<f64>> {
    let supported = norm_type == f64::INFINITY || (norm_type.is_finite() && norm_type > 0.0);
    if !supported {
        return Ok(None);
    }
    let exec = exec(num_threads, backend)?;
    reduce_one(py, tensors, |b| {
        if as_torch {
            core::torch_norm(norm_type, b, exec)
        } else {
            core::norm(norm_type, b, exec)
        }
    })
}

/// Whether any element of `tensors` is NaN or ±inf (one read pass); `None` when torch must check.
#[pyfunction]
#[pyo3(signature = (tensors, *, num_threads=1, backend=None))]
fn any_nonfinite(
    py: Python<'_>,
    tensors: &Bound<'_, PyList>,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<Option<bool>> {
    let exec = exec(num_threads, backend)?;
    reduce_one(py, tensors, |b| core::any_nonfinite(b, exec))
}

/// Runs `f` on a written batch of the role lists (`written`: one flag per
/// role), then bumps the versions of `bumped`; False when torch must do it.
fn update<'py>(
    py: Python<'py>,
    lists: &[(&Bound<'py, PyList>, &str)],
    written: &[bool],
    bumped: &[&Bound<'py, PyList>],
    f: impl FnOnce(&TensorBatch) -> core::Result<()> + Send,
) -> PyResult<bool> {
    let mut keep =
        KeepAlive::with_capacity(lists.len() * lists.first().map_or(0, |(l, _)| l.len()));
    let Some(columns) = columns_of(lists, written, &mut keep)? else {
        return Ok(false);
    };
    let Some(batch) = writable(&columns)? else {
        return Ok(false);
    };
    run_in_flight(py, batch, written, |b| f(b))?;
    bump_versions(py, bumped)?;
    Ok(true)
}

/// Folds `grads` into the running means: `mean ← grad` when `first`, else
/// `mean + weight·(grad − mean)`; zeroes `grads` when `clear_grad`.
#[pyfunction]
#[pyo3(signature = (means, grads, *, weight, first, clear_grad=true, num_threads=1, backend=None))]
#[allow(clippy::too_many_arguments)]
fn accumulate_mean(
    py: Python<'_>,
    means: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    weight: f64,
    first: bool,
    clear_grad: bool,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let exec = exec(num_threads, backend)?;
    update(
        py,
        &[(means, "mean"), (grads, "grad")],
        &[true, clear_grad],
        &[means, grads],
        |b| core::accumulate_mean(b, weight, first, clear_grad, exec),
    )
}

/// `average ← lerp(average, param, weight)` over every pair (torch's lerp formula).
#[pyfunction]
#[pyo3(signature = (averages, params, *, weight, num_threads=1, backend=None))]
fn lerp_average(
    py: Python<'_>,
    averages: &Bound<'_, PyList>,
    params: &Bound<'_, PyList>,
    weight: f64,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let exec = exec(num_threads, backend)?;
    update(
        py,
        &[(averages, "average"), (params, "param")],
        &[true, false],
        &[averages],
        |b| core::lerp_average(b, weight, exec),
    )
}

/// `dst ← src · scale` for every pair.
#[pyfunction]
#[pyo3(signature = (dst, src, *, scale, num_threads=1, backend=None))]
fn copy_scaled(
    py: Python<'_>,
    dst: &Bound<'_, PyList>,
    src: &Bound<'_, PyList>,
    scale: f64,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let exec = exec(num_threads, backend)?;
    update(
        py,
        &[(dst, "destination"), (src, "source")],
        &[true, false],
        &[dst],
        |b| core::scale_into(b, scale, exec),
    )
}

/// `t ← t · scale` in place for every tensor.
#[pyfunction]
#[pyo3(signature = (tensors, *, scale, num_threads=1, backend=None))]
fn scale_(
    py: Python<'_>,
    tensors: &Bound<'_, PyList>,
    scale: f64,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let exec = exec(num_threads, backend)?;
    update(py, &[(tensors, "tensor")], &[true], &[tensors], |b| {
        core::scale_into(b, scale, exec)
    })
}

/// One pass of the bandwidth probe over `arrays` (`[params, grads(, m(, v))]`,
/// lists of equal length): the kernels' engine with one multiply-add per
/// written element (`benches/bandwidth.py`). False: some tensor needs torch.
#[pyfunction]
#[pyo3(signature = (arrays, *, num_threads=1, backend=None))]
fn stream_probe(
    py: Python<'_>,
    arrays: Vec<Bound<'_, PyList>>,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    if !(2..=4).contains(&arrays.len()) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "the stream probe takes 2 to 4 lists (params, grads, state...), got {}",
            arrays.len()
        )));
    }
    let exec = exec(num_threads, backend)?;
    let lists: Vec<_> = arrays.iter().map(|l| (l, "array")).collect();
    let written: Vec<bool> = (0..arrays.len()).map(|k| k != 1).collect();
    // Written in place like any kernel's arrays: autograd must hear of it.
    let bumped: Vec<_> = arrays
        .iter()
        .zip(&written)
        .filter(|(_, w)| **w)
        .map(|(l, _)| l)
        .collect();
    update(py, &lists, &written, &bumped, |b| {
        core::stream_probe(b, exec)
    })
}

/// Adds this file's functions to `oxoptim._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(subgradient_step, m)?)?;
    m.add_function(wrap_pyfunction!(direction_sq_norm, m)?)?;
    m.add_function(wrap_pyfunction!(prodigy_sums, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_norm, m)?)?;
    m.add_function(wrap_pyfunction!(any_nonfinite, m)?)?;
    m.add_function(wrap_pyfunction!(accumulate_mean, m)?)?;
    m.add_function(wrap_pyfunction!(lerp_average, m)?)?;
    m.add_function(wrap_pyfunction!(copy_scaled, m)?)?;
    m.add_function(wrap_pyfunction!(scale_, m)?)?;
    m.add_function(wrap_pyfunction!(stream_probe, m)?)?;
    Ok(())
}
