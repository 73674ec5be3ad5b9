//! `oxoptim._core`: a thin layer that turns torch tensors into checked raw
//! memory descriptors and calls the pure Rust kernels with the GIL released.

use oxoptim_core::{self as core, inflight, Backend, Exec, Footprint, RawTensor, TensorBatch};
use pyo3::exceptions::{
    PyNotImplementedError, PyOverflowError, PyRuntimeError, PyValueError, PyZeroDivisionError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyList, PyTuple};
use std::sync::Arc;

mod extras;
mod generic;
mod lowbit;
mod openmp;
mod tensors;

/// Tensors that share memory (the same parameter twice in a group, overlapping
/// views) are legal in torch, which updates them one after another, and so
/// is a state tensor whose dtype differs from its parameter's (torch
/// promotes): such a batch is handed back to torch's implementation (`None`)
/// instead of failing.
pub(crate) fn or_fallback<T>(r: core::Result<T>) -> PyResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        // A misaligned address (a float tensor at an odd byte offset of a buffer): torch's path.
        Err(core::Error::Overlap(_) | core::Error::Unsupported(_) | core::Error::BadAddress(_)) => {
            Ok(None)
        }
        Err(e) => Err(core_error(e)),
    }
}

pub(crate) fn core_error(e: core::Error) -> PyErr {
    // Python's float arithmetic errors are this interpreter's own (arguments and wording
    // vary with the platform: CPython formats an overflow from errno).
    let python_arithmetic = if e == core::Error::float_division_by_zero() {
        Some(c"1.0 / 0.0")
    } else if e == core::Error::zero_to_negative_power() {
        Some(c"0.0 ** -1.0")
    } else if e == core::Error::power_out_of_range() {
        Some(c"1e308 ** 2.0")
    } else {
        None
    };
    if let Some(expression) = python_arithmetic {
        if let Err(error) = Python::attach(|py| py.eval(expression, None, None).map(drop)) {
            return error;
        }
    }
    match e {
        core::Error::InvalidArgument(m) => PyValueError::new_err(m),
        core::Error::ZeroDivision(m) => PyZeroDivisionError::new_err(m),
        core::Error::Overflow(m) => PyOverflowError::new_err(m),
        core::Error::TorchNotImplemented(m) => PyNotImplementedError::new_err(m),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The instruction set the kernels run on: "avx512vbmi" (AVX-512 with byte
/// permutes for the 8-bit state), "avx512", "avx2", "neon" or "scalar".
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

/// Runs `kernel` on `batch` with the GIL released. The call is first
/// registered in flight with what it writes (`written`, one flag per array of
/// a slot), so that a call on another thread touching the same memory is
/// refused before anything is written, and vice versa.
///
/// The caller keeps every described tensor alive (a [`tensors::KeepAlive`])
/// until this returns.
pub(crate) fn run_in_flight<R: Send>(
    py: Python<'_>,
    batch: TensorBatch,
    written: &[bool],
    kernel: impl FnOnce(&TensorBatch) -> core::Result<R> + Send,
) -> PyResult<R> {
    let batch = Arc::new(batch);
    let footprint = Footprint::new(&batch, written).map_err(core_error)?;
    let _in_flight = inflight::enter(footprint).map_err(core_error)?;
    py.detach(|| kernel(&batch)).map_err(core_error)
}

/// Interleaves per-role tensor lists into slot-major arrays.
pub(crate) fn slots(columns: &[Vec<RawTensor>]) -> Vec<RawTensor> {
    let n = columns.first().map_or(0, Vec::len);
    (0..n)
        .flat_map(|i| columns.iter().map(move |c| c[i]))
        .collect()
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
    m.add_class::<tensors::TensorCache>()?;
    generic::register(m)?;
    extras::register(m)?;
    lowbit::register(m)?;
    Ok(())
}
