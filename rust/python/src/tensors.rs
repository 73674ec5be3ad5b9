//! Reading torch tensors as raw memory: every check that the unsafe
//! boundary in `oxoptim_core::tensors` relies on happens here.

use oxoptim_core::{DType, RawTensor};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;

pub enum Described {
    /// Every tensor is a dense, contiguous CPU tensor of a supported dtype.
    Ready(Vec<RawTensor>),
    /// Some tensor needs torch's own implementation (another device, layout,
    /// dtype or a non-contiguous view).
    Unsupported,
}

struct TorchTypes {
    strided: Py<PyAny>,
    dtypes: [(Py<PyAny>, DType); 4],
}

fn torch_types(py: Python<'_>) -> PyResult<&'static TorchTypes> {
    static TYPES: PyOnceLock<TorchTypes> = PyOnceLock::new();
    TYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let get = |name: &str| -> PyResult<Py<PyAny>> { Ok(torch.getattr(name)?.unbind()) };
        Ok(TorchTypes {
            strided: get("strided")?,
            dtypes: [
                (get("float32")?, DType::F32),
                (get("float64")?, DType::F64),
                (get("bfloat16")?, DType::BF16),
                (get("float16")?, DType::F16),
            ],
        })
    })
}

/// Describes one tensor, or `None` when the Rust path cannot take it.
fn describe(t: &Bound<'_, PyAny>, types: &TorchTypes) -> PyResult<Option<RawTensor>> {
    let py = t.py();
    if !t.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
        return Ok(None);
    }
    if !t.getattr(intern!(py, "layout"))?.is(types.strided.bind(py)) {
        return Ok(None);
    }
    let dtype = t.getattr(intern!(py, "dtype"))?;
    let Some(&(_, dtype)) = types.dtypes.iter().find(|(d, _)| dtype.is(d.bind(py))) else {
        return Ok(None);
    };
    // A contiguous strided tensor occupies exactly `numel` elements from `data_ptr`.
    if !t
        .call_method0(intern!(py, "is_contiguous"))?
        .extract::<bool>()?
    {
        return Ok(None);
    }
    let len: usize = t.call_method0(intern!(py, "numel"))?.extract()?;
    let addr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
    Ok(Some(RawTensor { addr, len, dtype }))
}

/// Describes every tensor of `list`.
pub fn describe_all(list: &Bound<'_, PyList>) -> PyResult<Described> {
    let types = torch_types(list.py())?;
    let mut out = Vec::with_capacity(list.len());
    for t in list.iter() {
        match describe(&t, types)? {
            Some(raw) => out.push(raw),
            None => return Ok(Described::Unsupported),
        }
    }
    Ok(Described::Ready(out))
}
