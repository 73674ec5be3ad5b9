//! Whole-group steps: the tensors are gathered in Rust straight from a
//! parameter group and the optimizer's `state`, without torch's per-step
//! Python bookkeeping. Anything unusual (missing state on a first step, a
//! tensor the kernels cannot take) returns False so Python takes its general path.

use crate::run::{self, run_adam, run_sgd};
use crate::tensors::{describe_grad, torch_types, FirstOperand, KeepAlive, TensorCache};
use crate::{bump_versions, exec};
use oxoptim_core::{self as core, RawTensor};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

/// The tensors of one group's parameters that have a gradient.
struct Gathered<'py> {
    params: Bound<'py, PyList>,
    /// `[param, grad, state keys...]`, one vector per role.
    columns: Vec<Vec<RawTensor>>,
    /// The `counter` state entry of each parameter, when asked for.
    counters: Vec<RawTensor>,
    /// Every tensor described above, with its storage, until the step returns.
    _keep: KeepAlive<'py>,
}

/// Reads `params` (a group's list), each one's `.grad` and its state entries `keys`
/// (plus `counter`), or `None` when the general path must run.
fn gather<'py>(
    params: &Bound<'py, PyList>,
    state: &Bound<'py, PyDict>,
    keys: &[&str],
    counter: Option<&str>,
    first: FirstOperand,
    cache: &mut TensorCache,
) -> PyResult<Option<Gathered<'py>>> {
    let py = params.py();
    let types = torch_types(py)?;
    let with_grad = PyList::empty(py);
    // Interned once: a `&str` key would build a new Python string per lookup.
    let keys: Vec<Bound<'py, PyString>> = keys.iter().map(|k| PyString::intern(py, k)).collect();
    let counter = counter.map(|k| PyString::intern(py, k));
    let mut columns: Vec<Vec<RawTensor>> = vec![Vec::with_capacity(params.len()); 2 + keys.len()];
    let mut counters = Vec::new();
    let mut keep = KeepAlive::with_capacity(params.len() * (3 + keys.len()));
    for p in params.iter() {
        let grad = p.getattr(intern!(py, "grad"))?;
        if grad.is_none() {
            continue;
        }
        let Some(entry) = state.get_item(&p)? else {
            return Ok(None);
        };
        let Ok(entry) = entry.cast_into::<PyDict>() else {
            return Ok(None);
        };
        let Some(param) = cache.describe(&p, types, true, &mut keep)? else {
            return Ok(None);
        };
        let Some(grad) = describe_grad(&grad, &p, param, first, types, &mut keep)? else {
            return Ok(None);
        };
        columns[0].push(param);
        columns[1].push(grad);
        for (k, key) in keys.iter().enumerate() {
            let Some(t) = entry.get_item(key)? else {
                return Ok(None);
            };
            let Some(raw) = cache.describe(&t, types, false, &mut keep)? else {
                return Ok(None);
            };
            columns[2 + k].push(raw);
        }
        if let Some(key) = &counter {
            let Some(t) = entry.get_item(key)? else {
                return Ok(None);
            };
            let Some(raw) = cache.describe(&t, types, false, &mut keep)? else {
                return Ok(None);
            };
            counters.push(raw);
        }
        with_grad.append(p)?;
    }
    Ok(Some(Gathered {
        params: with_grad,
        columns,
        counters,
        _keep: keep,
    }))
}

/// SGD step over a whole group with existing momentum buffers (or momentum 0).
#[pyfunction]
#[pyo3(signature = (params, state, cache, *, lr, momentum, dampening, weight_decay, nesterov, maximize, num_threads=1))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_group_step(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    state: &Bound<'_, PyDict>,
    mut cache: PyRefMut<'_, TensorCache>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    num_threads: usize,
) -> PyResult<bool> {
    let config = core::SgdConfig {
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
    };
    let keys: &[&str] = if momentum != 0.0 {
        &["momentum_buffer"]
    } else {
        &[]
    };
    let first = run::sgd_first_operand(&config);
    let Some(g) = gather(params, state, keys, None, first, &mut cache)? else {
        return Ok(false);
    };
    let exec = exec(num_threads, None)?;
    let fresh = vec![false; g.columns[0].len()];
    let (memo, _) = cache.memos(params.as_any());
    // `g` holds every described tensor and its storage until the kernel returned.
    if !run_sgd(py, &config, &g.columns, &fresh, exec, memo)? {
        return Ok(false);
    }
    bump_versions(py, &[&g.params])?;
    Ok(true)
}

/// Adam/AdamW step over a whole group whose state is initialised.
#[pyfunction]
#[pyo3(signature = (params, state, cache, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, num_threads=1))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_group_step(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    state: &Bound<'_, PyDict>,
    mut cache: PyRefMut<'_, TensorCache>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    num_threads: usize,
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
    let keys: &[&str] = if amsgrad {
        &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    } else {
        &["exp_avg", "exp_avg_sq"]
    };
    let first = run::adam_first_operand(&config);
    let Some(g) = gather(params, state, keys, Some("step"), first, &mut cache)? else {
        return Ok(false);
    };
    let exec = exec(num_threads, None)?;
    // `g` holds every described tensor and its storage until the kernel returned.
    if !run_adam(
        py,
        &config,
        &g.columns,
        g.counters,
        exec,
        cache.memos(params.as_any()),
    )? {
        return Ok(false);
    }
    bump_versions(py, &[&g.params])?;
    Ok(true)
}
