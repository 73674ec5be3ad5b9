//! Reading torch tensors as raw memory: every check that the unsafe
//! boundary in `oxoptim_core::tensors` relies on happens here.

use oxoptim_core::{DType, DisjointMemo, RawTensor};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use std::collections::HashMap;

pub enum Described {
    /// Every tensor is a dense, contiguous CPU tensor of a supported dtype.
    Ready(Vec<RawTensor>),
    /// Some tensor needs torch's own implementation (another device, layout,
    /// dtype or a non-contiguous view).
    Unsupported,
}

pub(crate) struct TorchTypes {
    strided: Py<PyAny>,
    /// Unbound `Tensor` methods: calling these skips creating a bound method per call.
    data_ptr: Py<PyAny>,
    numel: Py<PyAny>,
    is_contiguous: Py<PyAny>,
    dtypes: [(Py<PyAny>, DType); 4],
}

pub(crate) fn torch_types(py: Python<'_>) -> PyResult<&'static TorchTypes> {
    static TYPES: PyOnceLock<TorchTypes> = PyOnceLock::new();
    TYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let get = |name: &str| -> PyResult<Py<PyAny>> { Ok(torch.getattr(name)?.unbind()) };
        let tensor = torch.getattr("Tensor")?;
        let method = |name: &str| -> PyResult<Py<PyAny>> { Ok(tensor.getattr(name)?.unbind()) };
        Ok(TorchTypes {
            strided: get("strided")?,
            data_ptr: method("data_ptr")?,
            numel: method("numel")?,
            is_contiguous: method("is_contiguous")?,
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
impl TorchTypes {
    pub(crate) fn data_ptr(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.data_ptr.bind(t.py()).call1((t,))?.extract()
    }
    pub(crate) fn numel(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.numel.bind(t.py()).call1((t,))?.extract()
    }
    pub(crate) fn is_contiguous(&self, t: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.is_contiguous.bind(t.py()).call1((t,))?.extract()
    }
}

pub(crate) fn describe(t: &Bound<'_, PyAny>, types: &TorchTypes) -> PyResult<Option<RawTensor>> {
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
    if !types.is_contiguous(t)? {
        return Ok(None);
    }
    let len = types.numel(t)?;
    let addr = types.data_ptr(t)?;
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

/// A gradient of `param`: torch's grad setter guarantees the device and shape
/// match the parameter, so contiguity, dtype and length are what is left.
pub(crate) fn describe_grad(
    g: &Bound<'_, PyAny>,
    param: RawTensor,
    types: &TorchTypes,
) -> PyResult<Option<RawTensor>> {
    let py = g.py();
    // Sparse gradients report False here (and have no data pointer).
    if !types.is_contiguous(g)? {
        return Ok(None);
    }
    let dtype = g.getattr(intern!(py, "dtype"))?;
    if !types
        .dtypes
        .iter()
        .any(|(d, dt)| *dt == param.dtype && dtype.is(d.bind(py)))
    {
        return Ok(None);
    }
    let len = types.numel(g)?;
    if len != param.len {
        return Ok(None);
    }
    let addr = types.data_ptr(g)?;
    Ok(Some(RawTensor {
        addr,
        len,
        dtype: param.dtype,
    }))
}

/// Remembers the full description of long-lived tensors (parameters and
/// optimizer state) between steps, so that a step re-reads only the data
/// pointer (and, for parameters, contiguity, since users swap `.data` for views).
///
/// Soundness: an entry holds the tensor (so its address, the key, cannot be
/// reused by another object) and the tensor's storage as it was described, so
/// the memory range of the description stays allocated even if the tensor is
/// later re-pointed (`set_`, `.data =`, `resize_`); a re-pointed tensor
/// shows a new data pointer and is described again. Entries no group used
/// during a step are dropped at its end.
#[pyclass(module = "oxoptim._core")]
#[derive(Default)]
pub struct TensorCache {
    entries: HashMap<usize, CacheEntry, BuildAddressHasher>,
    /// Per parameter group (keyed by its params list): the overlap proofs of
    /// the last layouts, for the arrays and for arrays plus step counters.
    memos: HashMap<usize, (DisjointMemo, DisjointMemo, u64), BuildAddressHasher>,
    epoch: u64,
}

/// Object addresses are already unique: mixing them with one multiply is
/// enough (SipHash was a visible cost with thousands of tensors per step).
#[derive(Default, Clone, Copy)]
pub struct BuildAddressHasher;

#[derive(Default)]
pub struct AddressHasher(u64);

impl std::hash::BuildHasher for BuildAddressHasher {
    type Hasher = AddressHasher;
    fn build_hasher(&self) -> AddressHasher {
        AddressHasher(0)
    }
}

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

struct CacheEntry {
    _tensor: Py<PyAny>,
    _storage: Py<PyAny>,
    raw: RawTensor,
    epoch: u64,
}

#[pymethods]
impl TensorCache {
    #[new]
    fn new() -> Self {
        TensorCache::default()
    }

    /// Number of cached tensors.
    fn __len__(&self) -> usize {
        self.entries.len()
    }

    /// Starts an optimizer step: entries used from now on survive `finish_step`.
    fn begin_step(&mut self) {
        self.epoch += 1;
    }

    /// Ends an optimizer step, dropping entries no group used.
    fn finish_step(&mut self) {
        let epoch = self.epoch;
        self.entries.retain(|_, e| e.epoch == epoch);
        self.memos.retain(|_, m| m.2 == epoch);
    }
}

impl TensorCache {
    /// The overlap memos of the group whose params list is `group`.
    pub(crate) fn memos(
        &mut self,
        group: &Bound<'_, PyAny>,
    ) -> (&mut DisjointMemo, &mut DisjointMemo) {
        let epoch = self.epoch;
        let m = self.memos.entry(group.as_ptr() as usize).or_default();
        m.2 = epoch;
        (&mut m.0, &mut m.1)
    }

    /// Like [`describe`], answered from the cache when the tensor still points
    /// at the same memory.
    pub(crate) fn describe(
        &mut self,
        t: &Bound<'_, PyAny>,
        types: &TorchTypes,
        is_param: bool,
    ) -> PyResult<Option<RawTensor>> {
        let py = t.py();
        let key = t.as_ptr() as usize;
        if let Some(entry) = self.entries.get_mut(&key) {
            let addr = types.data_ptr(t)?;
            let contiguous = !is_param || types.is_contiguous(t)?;
            if addr == entry.raw.addr && contiguous {
                entry.epoch = self.epoch;
                return Ok(Some(entry.raw));
            }
            self.entries.remove(&key);
        }
        let raw = describe(t, types)?;
        if let Some(raw) = raw {
            let storage = t.call_method0(intern!(py, "untyped_storage"))?.unbind();
            self.entries.insert(
                key,
                CacheEntry {
                    _tensor: t.clone().unbind(),
                    _storage: storage,
                    raw,
                    epoch: self.epoch,
                },
            );
        }
        Ok(raw)
    }
}
