//! `oxoptim._core`: a thin layer that turns torch tensors into checked raw
//! memory descriptors and calls the pure Rust kernels with the GIL released.

use oxoptim_core::{self as core, Backend, DisjointMemo, Exec, RawTensor};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyList, PyTuple};

mod extras;
mod group;
mod openmp;
mod run;
mod tensors;
use tensors::{column, param_and_grad_columns, KeepAlive};

/// Tensors that share memory (the same parameter twice in a group, overlapping
/// views) are legal in torch, which updates them one after another, and so
/// is a state tensor whose dtype differs from its parameter's (torch
/// promotes): such a batch is handed back to torch's implementation (`None`)
/// instead of failing.
pub(crate) fn or_fallback<T>(r: core::Result<T>) -> PyResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(core::Error::Overlap(_) | core::Error::Unsupported(_)) => Ok(None),
        Err(e) => Err(core_error(e)),
    }
}

pub(crate) fn core_error(e: core::Error) -> PyErr {
    match e {
        core::Error::InvalidArgument(m) => PyValueError::new_err(m),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The instruction set the kernels run on: "avx512", "avx2", "neon" or "scalar".
#[pyfunction]
fn simd_backend() -> &'static str {
    Backend::active().name()
}

/// Every instruction set this CPU supports, slowest first.
#[pyfunction]
fn supported_backends() -> Vec<&'static str> {
    Backend::supported()
        .into_iter()
        .map(Backend::name)
        .collect()
}

/// Number of native calls running now (registered in flight), in any thread.
#[pyfunction]
fn calls_in_flight() -> usize {
    core::inflight::calls_in_flight()
}

/// The worker team kernels run on: "openmp" (torch's own threads) or "rayon".
#[pyfunction]
fn parallel_backend() -> &'static str {
    openmp::install()
}

pub(crate) fn exec(num_threads: usize, backend: Option<&str>) -> PyResult<Exec> {
    openmp::install();
    let backend = match backend {
        None => Backend::active(),
        Some(name) => match Backend::parse(name) {
            Some(b) if b.is_supported() => b,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "SIMD backend {name:?} is not available on this CPU"
                )))
            }
        },
    };
    Ok(Exec::new(backend, num_threads))
}

/// Interleaves per-role tensor lists into slot-major arrays.
pub(crate) fn slots(columns: &[Vec<RawTensor>]) -> Vec<RawTensor> {
    let n = columns.first().map_or(0, Vec::len);
    (0..n)
        .flat_map(|i| columns.iter().map(move |c| c[i]))
        .collect()
}

/// One SGD step over a parameter group. Returns False (having touched
/// nothing) when some tensor needs torch's own implementation.
#[pyfunction]
#[pyo3(signature = (params, grads, momentum_buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov, maximize, num_threads=1, backend=None))]
#[allow(clippy::too_many_arguments)]
fn sgd_step(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    momentum_buffers: &Bound<'_, PyList>,
    fresh: Vec<bool>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let config = core::SgdConfig {
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
    };
    let n = params.len();
    let mut keep = KeepAlive::with_capacity(3 * n);
    let first = run::sgd_first_operand(&config);
    let Some(mut columns) = param_and_grad_columns(params, grads, first, &mut keep)? else {
        return Ok(false);
    };
    if momentum != 0.0 {
        match column(momentum_buffers, n, "momentum_buffer", &mut keep)? {
            Some(c) => columns.push(c),
            None => return Ok(false),
        }
        if fresh.len() != n {
            return Err(PyValueError::new_err(format!(
                "expected {n} fresh flags, got {}",
                fresh.len()
            )));
        }
    }
    let exec = exec(num_threads, backend)?;
    if !run::run_sgd(
        py,
        &config,
        &columns,
        &fresh,
        exec,
        &mut DisjointMemo::default(),
    )? {
        return Ok(false);
    }
    bump_versions(py, &[params, momentum_buffers])?;
    Ok(true)
}

/// One Adam/AdamW step over a parameter group; increments each `state_steps`
/// counter. Returns False (having touched nothing) when some tensor needs
/// torch's own implementation.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, num_threads=1, backend=None))]
#[allow(clippy::too_many_arguments)]
fn adam_step(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    exp_avgs: &Bound<'_, PyList>,
    exp_avg_sqs: &Bound<'_, PyList>,
    max_exp_avg_sqs: &Bound<'_, PyList>,
    state_steps: &Bound<'_, PyList>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    num_threads: usize,
    backend: Option<&str>,
) -> PyResult<bool> {
    let config = core::AdamConfig {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        amsgrad,
        maximize,
        decoupled_weight_decay,
    };
    let n = params.len();
    let mut keep = KeepAlive::with_capacity(6 * n);
    let first = run::adam_first_operand(&config);
    let Some(mut columns) = param_and_grad_columns(params, grads, first, &mut keep)? else {
        return Ok(false);
    };
    let mut roles = vec![(exp_avgs, "exp_avg"), (exp_avg_sqs, "exp_avg_sq")];
    if amsgrad {
        roles.push((max_exp_avg_sqs, "max_exp_avg_sq"));
    }
    for (list, role) in roles {
        match column(list, n, role, &mut keep)? {
            Some(c) => columns.push(c),
            None => return Ok(false),
        }
    }
    let Some(steps) = column(state_steps, n, "step", &mut keep)? else {
        return Ok(false);
    };
    let exec = exec(num_threads, backend)?;
    let memos = (&mut DisjointMemo::default(), &mut DisjointMemo::default());
    if !run::run_adam(py, &config, &columns, steps, exec, memos)? {
        return Ok(false);
    }
    bump_versions(
        py,
        &[params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],
    )?;
    Ok(true)
}

/// Tells autograd the tensors were modified in place, as torch's own in-place
/// ops do, so that misuse (stepping between forward and backward) is caught.
pub(crate) fn bump_versions(py: Python<'_>, lists: &[&Bound<'_, PyList>]) -> PyResult<()> {
    static INCREMENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let increment = INCREMENT.get_or_try_init(py, || -> PyResult<_> {
        Ok(py
            .import("torch.autograd.graph")?
            .getattr("increment_version")?
            .unbind())
    })?;
    let all = PyList::empty(py);
    for list in lists {
        for t in list.iter() {
            all.append(t)?;
        }
    }
    if !all.is_empty() {
        increment.bind(py).call1(PyTuple::new(py, [all])?)?;
    }
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_backend, m)?)?;
    m.add_function(wrap_pyfunction!(supported_backends, m)?)?;
    m.add_function(wrap_pyfunction!(parallel_backend, m)?)?;
    m.add_function(wrap_pyfunction!(calls_in_flight, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_class::<tensors::TensorCache>()?;
    m.add_function(wrap_pyfunction!(group::sgd_group_step, m)?)?;
    m.add_function(wrap_pyfunction!(group::adam_group_step, m)?)?;
    extras::register(m)?;
    Ok(())
}
