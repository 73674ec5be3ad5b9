//! Bindings for the subgradient method, gradient/parameter averaging and the
//! deterministic reductions (norms, any-non-finite). Same conventions as the
//! optimizer steps: tensors are checked and described here, kernels run with
//! the GIL released, and `False`/`None` means "some tensor needs torch".

use crate::{bump_versions, column, core_error, exec, or_fallback, slots};
use oxoptim_core::{self as core, RawTensor, TensorBatch};
use pyo3::prelude::*;
use pyo3::types::PyList;

/// Describes the role lists (equal lengths) as slots, or `None` when some tensor needs torch.
fn batch_of(lists: &[(&Bound<'_, PyList>, &str)]) -> PyResult<Option<TensorBatch>> {
    let n = lists.first().map_or(0, |(l, _)| l.len());
    let mut columns: Vec<Vec<RawTensor>> = Vec::with_capacity(lists.len());
    for (list, role) in lists {
        match column(list, n, role)? {
            Some(c) => columns.push(c),
            None => return Ok(None),
        }
    }
    // SAFETY: `describe_all` checked every tensor is a dense, contiguous CPU
    // tensor of a supported dtype; the caller's lists keep them alive for the call.
    // Tensors that share memory (two parameters given the very same gradient
    // tensor) are torch's to handle, like any other tensor the kernels cannot take.
    or_fallback(unsafe { TensorBatch::new(slots(&columns), lists.len()) })
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
    let Some(batch) = batch_of(&[(params, "param"), (grads, "grad")])? else {
        return Ok(false);
    };
    py.detach(|| core::subgradient_step(&config, &batch, exec))
        .map_err(core_error)?;
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
    let Some(batch) = batch_of(&[(params, "param"), (grads, "grad")])? else {
        return Ok(None);
    };
    py.detach(|| core::reduce(r, &batch, exec))
        .map(Some)
        .map_err(core_error)
}

/// The p-norm (1, 2, inf or finite p > 0) of all tensors as one vector,
/// deterministic whatever the thread count; `None` when torch must do it.
#[pyfunction]
#[pyo3(signature = (tensors, norm_type, *, num_threads=1, backend=None))]
fn tensor_norm(
    py: Python<'_>,
    tensors: &Bound<'_, PyList>,
    norm_type: f64,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<Option<f64>> {
    let supported = norm_type == f64::INFINITY || (norm_type.is_finite() && norm_type > 0.0);
    if !supported {
        return Ok(None);
    }
    let exec = exec(num_threads, backend)?;
    let Some(batch) = batch_of(&[(tensors, "tensor")])? else {
        return Ok(None);
    };
    py.detach(|| core::norm(norm_type, &batch, exec))
        .map(Some)
        .map_err(core_error)
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
    let Some(batch) = batch_of(&[(tensors, "tensor")])? else {
        return Ok(None);
    };
    py.detach(|| core::any_nonfinite(&batch, exec))
        .map(Some)
        .map_err(core_error)
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
    let Some(batch) = batch_of(&[(means, "mean"), (grads, "grad")])? else {
        return Ok(false);
    };
    py.detach(|| core::accumulate_mean(&batch, weight, first, clear_grad, exec))
        .map_err(core_error)?;
    bump_versions(py, &[means, grads])?;
    Ok(true)
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
    let Some(batch) = batch_of(&[(averages, "average"), (params, "param")])? else {
        return Ok(false);
    };
    py.detach(|| core::lerp_average(&batch, weight, exec))
        .map_err(core_error)?;
    bump_versions(py, &[averages])?;
    Ok(true)
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
    let Some(batch) = batch_of(&[(dst, "destination"), (src, "source")])? else {
        return Ok(false);
    };
    py.detach(|| core::scale_into(&batch, scale, exec))
        .map_err(core_error)?;
    bump_versions(py, &[dst])?;
    Ok(true)
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
    let Some(batch) = batch_of(&[(tensors, "tensor")])? else {
        return Ok(false);
    };
    py.detach(|| core::scale_into(&batch, scale, exec))
        .map_err(core_error)?;
    bump_versions(py, &[tensors])?;
    Ok(true)
}

/// Adds this file's functions to `oxoptim._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(subgradient_step, m)?)?;
    m.add_function(wrap_pyfunction!(direction_sq_norm, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_norm, m)?)?;
    m.add_function(wrap_pyfunction!(any_nonfinite, m)?)?;
    m.add_function(wrap_pyfunction!(accumulate_mean, m)?)?;
    m.add_function(wrap_pyfunction!(lerp_average, m)?)?;
    m.add_function(wrap_pyfunction!(copy_scaled, m)?)?;
    m.add_function(wrap_pyfunction!(scale_, m)?)?;
    Ok(())
}
