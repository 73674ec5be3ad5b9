//! Reading torch tensors as raw memory: every check that the unsafe
//! boundary in `oxoptim_core::tensors` relies on happens here.

use oxoptim_core::{DType, DisjointMemo, RawTensor};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use std::collections::HashMap;

pub enum Described {
    /// Every tensor is a dense, contiguous CPU tensor of a supported dtype.
    Ready(Vec<RawTensor>),
    /// Some tensor needs torch's own implementation (another device, layout,
    /// dtype, a non-contiguous view or a tensor subclass).
    Unsupported,
}

/// Owned references to every tensor a native call reads or writes, and to
/// the storage each one pointed at when it was described. They are dropped
/// only after the call returned, so nothing another thread does meanwhile
/// (`p.grad = None`, `.data =`, `set_`, emptying a list it passed) can free
/// memory a kernel uses.
///
/// It also keeps torch-function modes off for the call (see [`KeepAlive::modes_off`]).
pub(crate) struct KeepAlive<'py> {
    held: Vec<Bound<'py, PyAny>>,
    /// Whether the modes were looked at; the `DisableTorchFunction` context entered, if any.
    modes_checked: bool,
    modes_off: Option<Bound<'py, PyAny>>,
    /// The `_DisableTorchDispatch` context entered, if any (see [`KeepAlive::modes_off`]).
    dispatch_off: Option<Bound<'py, PyAny>>,
}

impl<'py> KeepAlive<'py> {
    pub(crate) fn with_capacity(tensors: usize) -> Self {
        KeepAlive {
            held: Vec::with_capacity(2 * tensors),
            modes_checked: false,
            modes_off: None,
            dispatch_off: None,
        }
    }

    fn hold(&mut self, tensor: &Bound<'py, PyAny>, storage: Bound<'py, PyAny>) {
        self.held.push(tensor.clone());
        self.held.push(storage);
    }

    /// Before the call's first description: an active torch-function mode (a user's
    /// `TorchFunctionMode`, `torch.set_default_device`) sees every `Tensor` method the
    /// description calls, also on plain tensors, and could misreport a length or free the
    /// memory just described; so the modes are off (torch's `DisableTorchFunction`, this
    /// thread only) until the call returns. Likewise torch-dispatch modes (a user's
    /// `TorchDispatchMode`, `FakeTensorMode`): they see the `detach` that makes a tensor's
    /// storage holder and could hand back a tensor of other memory, so that the memory
    /// described is not held (torch's `_DisableTorchDispatch`). Two C calls when none is active.
    fn modes_off(&mut self, py: Python<'py>, types: &TorchTypes) -> PyResult<()> {
        if self.modes_checked {
            return Ok(());
        }
        self.modes_checked = true;
        if types.mode_enabled.bind(py).call0()?.is_truthy()? {
            let context = types.disable_torch_function.bind(py).call0()?;
            context.call_method0(intern!(py, "__enter__"))?;
            self.modes_off = Some(context);
        }
        if types.dispatch_depth.bind(py).call0()?.extract::<usize>()? > 0 {
            let context = types.disable_torch_dispatch.bind(py).call0()?;
            context.call_method0(intern!(py, "__enter__"))?;
            self.dispatch_off = Some(context);
        }
        Ok(())
    }
}

impl Drop for KeepAlive<'_> {
    fn drop(&mut self) {
        for context in [self.dispatch_off.take(), self.modes_off.take()]
            .into_iter()
            .flatten()
        {
            let py = context.py();
            if let Err(e) =
                context.call_method1(intern!(py, "__exit__"), (py.None(), py.None(), py.None()))
            {
                e.write_unraisable(py, Some(&context));
            }
        }
    }
}

pub(crate) struct TorchTypes {
    strided: Py<PyAny>,
    /// Types whose methods run no Python code: plain tensors and parameters.
    tensor: Py<PyAny>,
    parameter: Py<PyAny>,
    /// Unbound `Tensor` methods: calling these skips creating a bound method per call.
    data_ptr: Py<PyAny>,
    numel: Py<PyAny>,
    is_contiguous: Py<PyAny>,
    is_neg: Py<PyAny>,
    is_zerotensor: Py<PyAny>,
    is_inference: Py<PyAny>,
    detach: Py<PyAny>,
    dtypes: [(Py<PyAny>, DType); 5],
    /// `torch._C._is_torch_function_mode_enabled` and `torch._C.DisableTorchFunction`.
    mode_enabled: Py<PyAny>,
    disable_torch_function: Py<PyAny>,
    /// `torch._C._len_torch_dispatch_stack` and `torch._C._DisableTorchDispatch`.
    dispatch_depth: Py<PyAny>,
    disable_torch_dispatch: Py<PyAny>,
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
            tensor: tensor.clone().unbind(),
            parameter: torch.getattr("nn")?.getattr("Parameter")?.unbind(),
            data_ptr: method("data_ptr")?,
            numel: method("numel")?,
            is_contiguous: method("is_contiguous")?,
            is_neg: method("is_neg")?,
            is_zerotensor: method("_is_zerotensor")?,
            is_inference: method("is_inference")?,
            detach: method("detach")?,
            dtypes: [
                (get("float32")?, DType::F32),
                (get("float64")?, DType::F64),
                (get("bfloat16")?, DType::BF16),
                (get("float16")?, DType::F16),
                (get("uint8")?, DType::U8),
            ],
            mode_enabled: torch
                .getattr("_C")?
                .getattr("_is_torch_function_mode_enabled")?
                .unbind(),
            disable_torch_function: torch
                .getattr("_C")?
                .getattr("DisableTorchFunction")?
                .unbind(),
            dispatch_depth: torch
                .getattr("_C")?
                .getattr("_len_torch_dispatch_stack")?
                .unbind(),
            disable_torch_dispatch: torch
                .getattr("_C")?
                .getattr("_DisableTorchDispatch")?
                .unbind(),
        })
    })
}

impl TorchTypes {
    /// torch's dtype object of `dtype`.
    fn dtype_object<'py>(&self, py: Python<'py>, dtype: DType) -> &Bound<'py, PyAny> {
        let (object, _) = self
            .dtypes
            .iter()
            .find(|(_, d)| *d == dtype)
            .expect("every DType a description holds comes from this table");
        object.bind(py)
    }
    pub(crate) fn data_ptr(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.data_ptr.bind(t.py()).call1((t,))?.extract()
    }
    pub(crate) fn numel(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.numel.bind(t.py()).call1((t,))?.extract()
    }
    pub(crate) fn is_contiguous(&self, t: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.is_contiguous.bind(t.py()).call1((t,))?.extract()
    }
    /// A lazily negated view (the neg bit): its memory holds the values un-negated.
    fn is_neg(&self, t: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.is_neg.bind(t.py()).call1((t,))?.extract()
    }
    /// A ZeroTensor (`torch._efficientzerotensor`, or a view of one): no
    /// memory behind it, its data pointer 0 or an offset from 0.
    fn is_zerotensor(&self, t: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.is_zerotensor.bind(t.py()).call1((t,))?.extract()
    }
    /// A tensor made under `torch.inference_mode()`: torch refuses to update
    /// it in place outside that mode.
    fn is_inference(&self, t: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.is_inference.bind(t.py()).call1((t,))?.extract()
    }
    /// A new tensor of its own on `t`'s storage: it keeps that memory
    /// allocated whatever happens to `t`. Not `untyped_storage()`: a Python
    /// storage object freed while autograd (without the GIL) drops other
    /// references to the same storage trips torch's `THPStorage_dealloc`
    /// assertion and aborts the process (seen with `step_in_backward(overlap=True)`).
    /// Not a DLPack capsule (`to_dlpack`) either: torch's capsule holds the
    /// tensor itself, so a `set_` on it frees the memory under the capsule.
    fn storage_holder<'py>(&self, t: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.detach.bind(t.py()).call1((t,))
    }
    /// A plain tensor or parameter: its attributes and methods are C code, so
    /// a description is read with the GIL held throughout (no other thread can
    /// re-point the tensor halfway) and cannot be faked by `__torch_function__`.
    fn is_plain(&self, t: &Bound<'_, PyAny>) -> bool {
        let ty = t.get_type();
        ty.is(self.tensor.bind(t.py())) || ty.is(self.parameter.bind(t.py()))
    }
}

/// Describes one tensor with the storage it points at, or `None` when the
/// Rust path cannot take it.
fn describe_with_storage<'py>(
    t: &Bound<'py, PyAny>,
    types: &TorchTypes,
) -> PyResult<Option<(RawTensor, Bound<'py, PyAny>)>> {
    let py = t.py();
    if !types.is_plain(t) {
        return Ok(None);
    }
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
    // A contiguous strided tensor occupies exactly `numel` elements from `data_ptr`;
    // a neg-bit view's memory holds its values un-negated; a ZeroTensor has no memory.
    if !types.is_contiguous(t)? || types.is_neg(t)? || types.is_zerotensor(t)? {
        return Ok(None);
    }
    // The storage first: it holds the memory `data_ptr` points into.
    let storage = types.storage_holder(t)?;
    let len = types.numel(t)?;
    let addr = types.data_ptr(t)?;
    Ok(Some((RawTensor { addr, len, dtype }, storage)))
}

/// [`describe_with_storage`] of a tensor the call writes, with its shape (its
/// `torch.Size`): `None` also for an inference tensor, which torch refuses to
/// update in place (checked once, when the cache first describes a tensor).
#[allow(clippy::type_complexity)]
fn describe_shaped<'py>(
    t: &Bound<'py, PyAny>,
    types: &TorchTypes,
) -> PyResult<Option<(RawTensor, Bound<'py, PyAny>, Bound<'py, PyAny>)>> {
    let Some((raw, storage)) = describe_with_storage(t, types)? else {
        return Ok(None);
    };
    if types.is_inference(t)? {
        return Ok(None);
    }
    let shape = t.getattr(intern!(t.py(), "shape"))?;
    Ok(Some((raw, storage, shape)))
}

/// Like [`describe`], for a tensor the call writes (`None` for an inference
/// tensor), with its shape (its `torch.Size`).
pub(crate) fn describe_with_shape<'py>(
    t: &Bound<'py, PyAny>,
    types: &TorchTypes,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<(RawTensor, Bound<'py, PyAny>)>> {
    keep.modes_off(t.py(), types)?;
    let Some((raw, storage, shape)) = describe_shaped(t, types)? else {
        return Ok(None);
    };
    keep.hold(t, storage);
    Ok(Some((raw, shape)))
}

/// Describes one tensor, holding it and its storage in `keep`, or `None`
/// when the Rust path cannot take it.
pub(crate) fn describe<'py>(
    t: &Bound<'py, PyAny>,
    types: &TorchTypes,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<RawTensor>> {
    keep.modes_off(t.py(), types)?;
    let Some((raw, storage)) = describe_with_storage(t, types)? else {
        return Ok(None);
    };
    keep.hold(t, storage);
    Ok(Some(raw))
}

/// Describes every tensor of `list`, holding each in `keep`; when the call
/// writes them (`written`), an inference tensor needs torch (which refuses it).
pub fn describe_all<'py>(
    list: &Bound<'py, PyList>,
    written: bool,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Described> {
    let types = torch_types(list.py())?;
    keep.modes_off(list.py(), types)?;
    let mut out = Vec::with_capacity(list.len());
    for t in list.iter() {
        if written && types.is_plain(&t) && types.is_inference(&t)? {
            return Ok(Described::Unsupported);
        }
        match describe(&t, types, keep)? {
            Some(raw) => out.push(raw),
            None => return Ok(Described::Unsupported),
        }
    }
    Ok(Described::Ready(out))
}

/// Describes `list`, which must hold `n` tensors of `role` (which the call
/// writes when `written`), or `None` when some tensor needs torch.
pub(crate) fn column<'py>(
    list: &Bound<'py, PyList>,
    n: usize,
    role: &str,
    written: bool,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<Vec<RawTensor>>> {
    check_len(list, n, role)?;
    match describe_all(list, written, keep)? {
        Described::Ready(v) => Ok(Some(v)),
        Described::Unsupported => Ok(None),
    }
}

fn check_len(list: &Bound<'_, PyList>, n: usize, role: &str) -> PyResult<()> {
    if list.len() != n {
        return Err(PyValueError::new_err(format!(
            "expected {n} {role} tensors, got {}",
            list.len()
        )));
    }
    Ok(())
}

/// Describes `grads[i]` as the gradient of `params[i]` (described as
/// `described[i]`), with the checks of [`describe_grad`].
pub(crate) fn grad_column<'py>(
    params: &Bound<'py, PyList>,
    grads: &Bound<'py, PyList>,
    described: &[RawTensor],
    first: FirstOperand,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<Vec<RawTensor>>> {
    check_len(grads, params.len(), "grad")?;
    let types = torch_types(params.py())?;
    let mut out = Vec::with_capacity(described.len());
    for ((p, g), &raw) in params.iter().zip(grads.iter()).zip(described) {
        match describe_grad(&g, &p, raw, first, types, keep)? {
            Some(r) => out.push(r),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// `[param, grad]` columns of a step (that writes the parameters when
/// `params_written`), or `None` when torch must run it.
pub(crate) fn param_and_grad_columns<'py>(
    params: &Bound<'py, PyList>,
    grads: &Bound<'py, PyList>,
    first: FirstOperand,
    params_written: bool,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<Vec<Vec<RawTensor>>>> {
    let Some(p) = column(params, params.len(), "param", params_written, keep)? else {
        return Ok(None);
    };
    let Some(g) = grad_column(params, grads, &p, first, keep)? else {
        return Ok(None);
    };
    Ok(Some(vec![p, g]))
}

/// Which tensor torch's first failing op reads as its operand `a` when a
/// gradient's shape does not match its parameter's: the parameter (or a
/// parameter-shaped state tensor, as in `param.add_(grad)`,
/// `exp_avg.lerp_(grad)`), or the gradient (`grad.add(param, alpha=wd)`,
/// which comes first under coupled weight decay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FirstOperand {
    Param,
    Grad,
}

/// Describes the gradient `g` of `param` (described as `param_raw`), holding
/// it in `keep`. Checked like any tensor (device, layout, dtype, contiguity:
/// a gradient swapped in through `.grad.data` skips torch's setter checks);
/// `None` (torch's path) when its dtype differs from the parameter's (torch
/// promotes) or the shapes differ but broadcast; torch's size error when the
/// shapes cannot broadcast.
pub(crate) fn describe_grad<'py>(
    g: &Bound<'py, PyAny>,
    param: &Bound<'py, PyAny>,
    param_raw: RawTensor,
    first: FirstOperand,
    types: &TorchTypes,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<RawTensor>> {
    let py = g.py();
    keep.modes_off(py, types)?;
    let Some((raw, storage)) = describe_with_storage(g, types)? else {
        return Ok(None);
    };
    if raw.dtype != param_raw.dtype {
        return Ok(None);
    }
    // Two `torch.Size` tuples compared: cheaper than `Tensor.is_same_size`,
    // which goes through torch's argument parser and dispatcher.
    let param_shape = param.getattr(intern!(py, "shape"))?;
    let grad_shape = g.getattr(intern!(py, "shape"))?;
    if !param_shape.eq(&grad_shape)? {
        let (p, g): (Vec<i64>, Vec<i64>) = (param_shape.extract()?, grad_shape.extract()?);
        let (a, b) = match first {
            FirstOperand::Param => (&p, &g),
            FirstOperand::Grad => (&g, &p),
        };
        return match broadcast_error(a, b) {
            Some(message) => Err(PyRuntimeError::new_err(message)),
            None => Ok(None),
        };
    }
    // Equal shapes, so equal lengths, unless the cached parameter description
    // predates an in-place resize: describe it afresh on torch's path.
    if raw.len != param_raw.len {
        return Ok(None);
    }
    keep.hold(g, storage);
    Ok(Some(raw))
}

/// Describes the gradient `g` of a parameter described as `param_raw`, of
/// shape `param_shape`, for the generic step, holding it in `keep`: `None`
/// (torch's path, which promotes, broadcasts or raises its own error) unless
/// it is a plain dense contiguous CPU tensor of the parameter's dtype and shape.
pub(crate) fn describe_grad_twin<'py>(
    g: &Bound<'py, PyAny>,
    param_shape: &Bound<'py, PyAny>,
    param_raw: RawTensor,
    types: &TorchTypes,
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<RawTensor>> {
    let py = g.py();
    keep.modes_off(py, types)?;
    let Some((raw, storage)) = describe_with_storage(g, types)? else {
        return Ok(None);
    };
    if raw.dtype != param_raw.dtype || raw.len != param_raw.len {
        return Ok(None);
    }
    if !g.getattr(intern!(py, "shape"))?.eq(param_shape)? {
        return Ok(None);
    }
    keep.hold(g, storage);
    Ok(Some(raw))
}

/// torch's error when shapes `a` and `b` do not broadcast (its `infer_size`,
/// scanning dimensions from the last), or `None` when they do.
fn broadcast_error(a: &[i64], b: &[i64]) -> Option<String> {
    let ndim = a.len().max(b.len());
    (0..ndim).rev().find_map(|dim| {
        let size = |s: &[i64]| (dim + s.len()).checked_sub(ndim).map_or(1, |i| s[i]);
        let (x, y) = (size(a), size(b));
        (x != y && x != 1 && y != 1).then(|| {
            format!(
                "The size of tensor a ({x}) must match the size of tensor b ({y}) at non-singleton dimension {dim}"
            )
        })
    })
}

/// Remembers the full description of long-lived tensors (parameters and
/// optimizer state) between steps, so that a step re-reads only what can
/// change while the tensor object stays the same: its data pointer (`set_`,
/// `resize_`), dtype (`.data = .data.view(dtype)`), shape (`.data =` a
/// reshaped view, `resize_` to fewer elements at the same address),
/// contiguity (`t_()`, `.data =` a transposed view) and neg bit (`.data =
/// torch._neg_view(...)`). Device and layout cannot change under the same
/// data pointer (`.data =` refuses a tensor of another type).
///
/// Soundness: an entry holds the tensor (so its address, the key, cannot be
/// reused by another object) and the tensor's storage as it was described, so
/// the memory range of the description stays allocated even if the tensor is
/// later re-pointed (`set_`, `.data =`); a re-pointed or reallocated
/// (`resize_`) tensor shows a new data pointer and is described again. Every
/// step also holds what it uses in a [`KeepAlive`]. Entries no group used
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
    tensor: Py<PyAny>,
    storage: Py<PyAny>,
    raw: RawTensor,
    /// The tensor's `torch.Size` when described.
    shape: Py<PyAny>,
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

    /// Starts an optimizer step: entries used from now on survive
    /// `finish_step`. The in-flight error, changing nothing, while a step of
    /// the same optimizer runs on another thread.
    fn begin_step(slf: &Bound<'_, Self>) -> PyResult<()> {
        TensorCache::borrow_for_step(slf)?.epoch += 1;
        Ok(())
    }

    /// Ends an optimizer step, dropping entries no group used; nothing while
    /// a step of the same optimizer runs on another thread (that step's end
    /// prunes them).
    fn finish_step(slf: &Bound<'_, Self>) {
        let Ok(mut cache) = slf.try_borrow_mut() else {
            return;
        };
        let epoch = cache.epoch;
        cache.entries.retain(|_, e| e.epoch == epoch);
        cache.memos.retain(|_, m| m.2 == epoch);
    }
}

impl TensorCache {
    /// The cache, borrowed for a step: a step of the same optimizer on
    /// another thread holds it (across its kernel, the GIL released), and
    /// this one gets the in-flight error of two calls updating the same
    /// tensors at once (not pyo3's `Already borrowed`), having changed nothing.
    pub(crate) fn borrow_for_step<'py>(cache: &Bound<'py, Self>) -> PyResult<PyRefMut<'py, Self>> {
        cache.try_borrow_mut().map_err(|_| {
            PyRuntimeError::new_err(
                "this optimizer's step is in flight on another thread: two threads must not \
                 update the same tensors at the same time (step an optimizer from one thread)",
            )
        })
    }

    /// The overlap memos of the group whose params list is `group`.
    pub(crate) fn memos(
        &mut self,
        group: &Bound<'_, PyAny>,
    ) -> (&mut DisjointMemo, &mut DisjointMemo) {
        self.memos_at(group.as_ptr() as usize)
    }

    /// The overlap memos kept under `key` (an object's address, plus a small
    /// index for one of several calls per group: objects are 16-byte aligned).
    pub(crate) fn memos_at(&mut self, key: usize) -> (&mut DisjointMemo, &mut DisjointMemo) {
        let epoch = self.epoch;
        let m = self.memos.entry(key).or_default();
        m.2 = epoch;
        (&mut m.0, &mut m.1)
    }

    /// Like [`describe_with_shape`], answered from the cache when the tensor
    /// still points at the same memory with the same dtype, length (shape when
    /// `want_shape`), contiguity and no neg bit; holds the tensor and its
    /// storage in `keep` either way. The shape comes back when `want_shape`
    /// or the tensor was described afresh.
    ///
    /// Cost of a hit: `data_ptr()`, `.dtype`, `.shape` and one `torch.Size`
    /// comparison (or, without `want_shape`, `numel()`, which allocates
    /// nothing), `is_contiguous()` (not for one element) and `is_neg()`:
    /// about 0.25 µs per tensor, against 0.07 µs for pointer and length alone.
    #[allow(clippy::type_complexity)]
    pub(crate) fn describe<'py>(
        &mut self,
        t: &Bound<'py, PyAny>,
        types: &TorchTypes,
        want_shape: bool,
        keep: &mut KeepAlive<'py>,
    ) -> PyResult<Option<(RawTensor, Option<Bound<'py, PyAny>>)>> {
        let py = t.py();
        keep.modes_off(py, types)?;
        let key = t.as_ptr() as usize;
        if let Some(entry) = self.entries.get_mut(&key) {
            // Cheapest first; each can change while the data pointer stays (even the type:
            // `p.__class__ = Subclass`, whose methods torch must run).
            if types.is_plain(t)
                && types.data_ptr(t)? == entry.raw.addr
                && t.getattr(intern!(py, "dtype"))?
                    .is(types.dtype_object(py, entry.raw.dtype))
            {
                // The same shape (so length), or the same length.
                let shape = if want_shape {
                    let shape = t.getattr(intern!(py, "shape"))?;
                    shape.eq(entry.shape.bind(py))?.then_some(Some(shape))
                } else {
                    (types.numel(t)? == entry.raw.len).then_some(None)
                };
                // A tensor of at most one element is contiguous whatever its
                // strides (the step counters: one call saved each).
                if let Some(shape) = shape {
                    if (entry.raw.len <= 1 || types.is_contiguous(t)?) && !types.is_neg(t)? {
                        entry.epoch = self.epoch;
                        keep.hold(entry.tensor.bind(py), entry.storage.bind(py).clone());
                        return Ok(Some((entry.raw, shape)));
                    }
                }
            }
            self.entries.remove(&key);
        }
        let Some((raw, storage, shape)) = describe_shaped(t, types)? else {
            return Ok(None);
        };
        self.entries.insert(
            key,
            CacheEntry {
                tensor: t.clone().unbind(),
                storage: storage.clone().unbind(),
                raw,
                shape: shape.clone().unbind(),
                epoch: self.epoch,
            },
        );
        keep.hold(t, storage);
        Ok(Some((raw, Some(shape))))
    }
}
