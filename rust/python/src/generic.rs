//! The optimizer steps, generated from the core's table
//! ([`oxoptim_core::OPTIMIZERS`]): no optimizer has code of its own here.
//!
//! * `step(kind, params, grads, state, scalars, hyper)`: tensors in lists, one
//!   list per state entry (the general path, after torch's `_init_group`).
//! * `group_step(kind, params, state, cache, hyper)`: tensors gathered here from
//!   a parameter group and the optimizer's `state`, descriptions cached between
//!   steps (the fast path).
//!
//! Both return False, having touched nothing, when some tensor needs torch's
//! own implementation (another device, dtype, layout; a gradient or state
//! entry that does not match its parameter; missing state; shared memory).
//! Every tensor the kernel reads or writes is held (with its storage) until
//! the kernel returns, so another thread dropping `p.grad` or re-pointing a
//! tensor meanwhile cannot free memory under it.

use crate::tensors::{
    describe_grad_twin, describe_with_shape, torch_types, KeepAlive, TensorCache, TorchTypes,
};
use crate::{bump_versions, core_error, exec, or_fallback, slots};
use oxoptim_core::optimizer::{find, with_bf16_state};
use oxoptim_core::{inflight, Footprint};
use oxoptim_core::{
    ArraySpec, Configured, DType, DisjointMemo, Entry, Extent, HyperKind, HyperValue, ParamRounding,
    RawTensor, ScalarState, TensorBatch, OPTIMIZERS,
};
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};
use std::sync::Arc;

fn entry(kind: &str) -> PyResult<Entry> {
    find(OPTIMIZERS, kind).map_err(core_error)
}

/// Reads a group's hyper-parameters as the table row declares them: numbers
/// (0-d tensors too), truth values (Python truthiness, as torch tests them),
/// pairs of numbers. Unknown keys are passed on for `configure` to reject.
/// `None` when a value is not what the kernels take (`None`, a bool or a
/// string for a number, a number outside float64's range, `(None, 50)` for a
/// pair): torch's implementation then runs, which uses it or raises its own
/// error, as torch would. `lenient`: such a number reads as NaN instead (for
/// the state layout, which only the flags and zero tests decide).
/// A finite hyper-parameter at least this large in magnitude is declined (torch's path runs):
/// torch converts some scalars to float32 with an overflow check and raises where the kernels,
/// computing in f64, would step to inf (`oxoptim._native.HUGE_HYPER`).
const HUGE_HYPER: f64 = 18446744073709551616.0; // 2**64

fn hyper_entries(
    entry: &Entry,
    hyper: &Bound<'_, PyDict>,
    lenient: bool,
) -> PyResult<Option<Vec<(String, HyperValue)>>> {
    let mut out = Vec::with_capacity(hyper.len());
    for (key, value) in hyper.iter() {
        let key: String = key.extract()?;
        let kind = entry
            .hyper
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, kind)| *kind);
        let number = |v: &Bound<'_, PyAny>| -> Option<f64> {
            // A bool extracts as 0 or 1, but torch's arithmetic treats it otherwise.
            if v.is_instance_of::<PyBool>() {
                return None;
            }
            let x = v.extract::<f64>().ok()?;
            (!(x.is_finite() && x.abs() >= HUGE_HYPER)).then_some(x)
        };
        let parsed = match kind {
            Some(HyperKind::Flag) => HyperValue::Flag(value.is_truthy()?),
            // Any sequence of two numbers, as torch unpacks it (`beta1, beta2 = group["betas"]`):
            // configs read from JSON or YAML give lists.
            Some(HyperKind::Pair) => {
                let items: Option<Vec<Bound<'_, PyAny>>> = value
                    .try_iter()
                    .ok()
                    .and_then(|it| it.collect::<PyResult<Vec<_>>>().ok());
                match items.as_deref() {
                    Some([a, b]) => match (number(a), number(b)) {
                        (Some(a), Some(b)) => HyperValue::Pair(a, b),
                        (a, b) if lenient => {
                            HyperValue::Pair(a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN))
                        }
                        _ => return Ok(None),
                    },
                    _ if lenient => HyperValue::Pair(f64::NAN, f64::NAN),
                    _ => return Ok(None),
                }
            }
            Some(HyperKind::Float) => match number(&value) {
                Some(x) => HyperValue::Float(x),
                None if lenient => HyperValue::Float(f64::NAN),
                None => return Ok(None),
            },
            // Never read: `configure` rejects it by name.
            None => HyperValue::Float(f64::NAN),
        };
        out.push((key, parsed));
    }
    Ok(Some(out))
}

/// The group's kernel configuration, or `None` (torch's path) when a value is
/// not one the kernels take.
fn configure(entry: &Entry, hyper: &Bound<'_, PyDict>) -> PyResult<Option<Box<dyn Configured>>> {
    let Some(entries) = hyper_entries(entry, hyper, false)? else {
        return Ok(None);
    };
    entry.configure(entries).map(Some).map_err(core_error)
}

/// The described tensors of one call, slot by slot, and the objects that keep
/// their memory alive.
struct Gathered<'py> {
    types: &'static TorchTypes,
    /// The parameter dtypes the kernel takes.
    param_dtypes: &'static [DType],
    /// What each of `[param, grad, state...]` holds.
    specs: Vec<ArraySpec>,
    /// The shape each state array must have next to its parameter's.
    shapes: Vec<StateShape>,
    /// `[param, grad, state...]`, one vector per role.
    columns: Vec<Vec<RawTensor>>,
    /// The scalar state cells, slot-major.
    cells: Vec<RawTensor>,
    /// Kahan compensation arrays, one per slot (empty without Kahan summation).
    compensation: Vec<RawTensor>,
    /// The caller's random-stream id of each slot (empty: the slot index).
    streams: Vec<u64>,
    /// The stream element each slot starts at (empty: 0).
    offsets: Vec<u64>,
    /// Every tensor described and the storage it pointed at, held until the call ends.
    keep: KeepAlive<'py>,
    params: Bound<'py, PyList>,
}

impl<'py> Gathered<'py> {
    fn new(
        py: Python<'py>,
        entry: &Entry,
        configured: &dyn Configured,
        bf16_state: bool,
        capacity: usize,
    ) -> PyResult<Self> {
        let specs = specs(configured, bf16_state);
        let shapes = state_shapes(entry, configured);
        let arity = specs.len();
        Ok(Gathered {
            types: torch_types(py)?,
            param_dtypes: entry.param_dtypes,
            specs,
            shapes,
            columns: vec![Vec::with_capacity(capacity); arity],
            cells: Vec::new(),
            compensation: Vec::new(),
            streams: Vec::new(),
            offsets: Vec::new(),
            keep: KeepAlive::with_capacity(capacity * (arity + 1)),
            params: PyList::empty(py),
        })
    }

    /// Describes `t`, which the call writes (a parameter, state array, cell or
    /// compensation), through `cache` when given, with its shape (when
    /// `want_shape`, or described afresh), holding it and its storage. Only
    /// plain tensors and parameters are described (`describe`), and no
    /// inference tensor.
    #[allow(clippy::type_complexity)]
    fn describe(
        &mut self,
        t: &Bound<'py, PyAny>,
        cache: Option<&mut TensorCache>,
        want_shape: bool,
    ) -> PyResult<Option<(RawTensor, Option<Bound<'py, PyAny>>)>> {
        match cache {
            Some(cache) => cache.describe(t, self.types, want_shape, &mut self.keep),
            None => Ok(describe_with_shape(t, self.types, &mut self.keep)?
                .map(|(raw, shape)| (raw, Some(shape)))),
        }
    }

    /// Adds one parameter with its gradient, state arrays, scalar cells and
    /// (with Kahan summation) compensation array. False when the Rust path
    /// cannot take them (nothing is kept then).
    fn push(
        &mut self,
        mut cache: Option<&mut TensorCache>,
        param: &Bound<'py, PyAny>,
        grad: &Bound<'py, PyAny>,
        state: &[Bound<'py, PyAny>],
        scalars: &[Bound<'py, PyAny>],
        compensation: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<bool> {
        let Some((p, Some(p_shape))) = self.describe(param, cache.as_deref_mut(), true)? else {
            return Ok(false);
        };
        if !self.param_dtypes.contains(&p.dtype) {
            return Ok(false);
        }
        // A gradient must be the parameter's twin: same dtype and shape, dense
        // and contiguous (torch raises or promotes otherwise, so it runs torch's path).
        let Some(g) = describe_grad_twin(grad, &p_shape, p, self.types, &mut self.keep)? else {
            return Ok(false);
        };
        let mut row = Vec::with_capacity(2 + state.len());
        row.push(p);
        row.push(g);
        for (k, t) in state.iter().enumerate() {
            let rule = self.shapes[k];
            let Some((raw, shape)) = self.describe(t, cache.as_deref_mut(), rule.needs_shape())?
            else {
                return Ok(false);
            };
            // A state tensor of the parameter's length but another shape: torch's
            // in-place ops raise its size error (or broadcast), so torch's path runs.
            if !self.specs[2 + k].admits(raw, p) || !rule.admits(shape.as_ref(), &p_shape)? {
                return Ok(false);
            }
            row.push(raw);
        }
        let mut cells = Vec::with_capacity(scalars.len());
        for t in scalars {
            match self.describe(t, cache.as_deref_mut(), false)? {
                Some((raw, _)) if raw.len == 1 && matches!(raw.dtype, DType::F32 | DType::F64) => {
                    cells.push(raw)
                }
                _ => return Ok(false),
            }
        }
        let comp = match compensation {
            None => None,
            Some(t) => match self.describe(t, cache, false)? {
                Some((raw, _)) if raw.dtype == DType::BF16 && raw.len == p.len => Some(raw),
                _ => return Ok(false),
            },
        };
        self.compensation.extend(comp);
        for (column, raw) in self.columns.iter_mut().zip(row) {
            column.push(raw);
        }
        self.cells.extend(cells);
        self.params.append(param)?;
        Ok(true)
    }

    /// Checks the arrays (the unsafe hand-over) and runs the step with the GIL
    /// released. False: the arrays share memory, torch must run it.
    fn run(
        &self,
        entry: &Entry,
        configured: &dyn Configured,
        exec: oxoptim_core::Exec,
        memos: (&mut DisjointMemo, &mut DisjointMemo),
    ) -> PyResult<bool> {
        let Some(prepared) = self.prepare(entry, exec, memos)? else {
            return Ok(false);
        };
        let _in_flight = inflight::enter(prepared.footprint()?).map_err(core_error)?;
        self.execute(entry, configured, exec, prepared)?;
        Ok(true)
    }

    /// The checked batch and scalar state of the gathered arrays (the unsafe
    /// hand-over); `None` when they share memory or some array cannot be
    /// taken (torch's path).
    fn prepare(
        &self,
        entry: &Entry,
        exec: oxoptim_core::Exec,
        memos: (&mut DisjointMemo, &mut DisjointMemo),
    ) -> PyResult<Option<Prepared>> {
        // SAFETY: every array was described from a live, dense, contiguous CPU
        // tensor of a supported dtype (`describe`, `describe_grad`), and each
        // tensor and its storage is held in `self.keep` (or by the cache,
        // borrowed for the whole call) until the call returns.
        let Some(batch) = or_fallback(unsafe {
            TensorBatch::with_specs(slots(&self.columns), &self.specs, memos.0)
        })?
        else {
            return Ok(None);
        };
        let batch = if matches!(exec.rounding, ParamRounding::Kahan) {
            // SAFETY: described and held like the arrays above.
            match or_fallback(unsafe { batch.with_compensation(self.compensation.clone()) })? {
                Some(b) => b,
                None => return Ok(None),
            }
        } else {
            batch
        };
        let batch = if self.streams.is_empty() {
            batch
        } else {
            batch
                .with_streams(self.streams.clone())
                .map_err(core_error)?
        };
        let batch = if self.offsets.is_empty() {
            batch
        } else {
            batch
                .with_offsets(self.offsets.clone())
                .map_err(core_error)?
        };
        let batch = Arc::new(batch);
        // SAFETY: the cells were described like the arrays, from live 0-d CPU
        // tensors held the same way.
        let Some(scalars) = or_fallback(unsafe {
            ScalarState::new_memo(self.cells.clone(), entry.scalars.len(), &batch, memos.1)
        })?
        else {
            return Ok(None);
        };
        Ok(Some(Prepared { batch, scalars }))
    }

    /// Runs a prepared step with the GIL released (its footprint registered in flight by the caller).
    fn execute(
        &self,
        entry: &Entry,
        configured: &dyn Configured,
        exec: oxoptim_core::Exec,
        mut prepared: Prepared,
    ) -> PyResult<()> {
        let py = self.params.py();
        py.detach(|| entry.step(configured, &prepared.batch, &mut prepared.scalars, exec))
            .map_err(core_error)
    }
}

/// A gathered call's checked arrays and scalar cells, ready to run.
struct Prepared {
    batch: Arc<TensorBatch>,
    scalars: ScalarState,
}

impl Prepared {
    /// What the call touches: the parameter, every state array and every
    /// scalar cell written, the gradient read. A call on another thread
    /// touching the same memory is refused before anything is written.
    fn footprint(&self) -> PyResult<Footprint> {
        let written: Vec<bool> = (0..self.batch.arity()).map(|k| k != 1).collect();
        Ok(Footprint::new(&self.batch, &written)
            .map_err(core_error)?
            .with_scalars(&self.scalars))
    }
}

/// How a state array's shape must relate to its parameter's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateShape {
    /// The parameter's shape (a parameter-shaped entry: `zeros_like(p)`).
    Param,
    /// 1-D ([`oxoptim_core::optimizer::Optimizer::FLAT_STATE`]: Prodigy's `s`).
    Flat,
    /// Whatever shape: its spec fixes its length only (quantised codes, block scales).
    Any,
}

impl StateShape {
    /// Whether the rule reads the state tensor's shape.
    fn needs_shape(self) -> bool {
        self != StateShape::Any
    }

    /// Whether a state tensor of shape `shape` (`None`: not read) fits a
    /// parameter of shape `param`.
    fn admits(self, shape: Option<&Bound<'_, PyAny>>, param: &Bound<'_, PyAny>) -> PyResult<bool> {
        match (self, shape) {
            (StateShape::Any, _) => Ok(true),
            (StateShape::Param, Some(shape)) => shape.eq(param),
            (StateShape::Flat, Some(shape)) => Ok(shape.len()? == 1),
            (_, None) => Ok(false),
        }
    }
}

/// The shape rule of each state array of `configured`, in step order.
fn state_shapes(entry: &Entry, configured: &dyn Configured) -> Vec<StateShape> {
    let specs = configured.array_specs();
    configured
        .state_keys()
        .iter()
        .zip(specs.iter().skip(2))
        .map(|(key, spec)| match spec.extent {
            Extent::Param if entry.flat_state.contains(key) => StateShape::Flat,
            // Quantised codes too: shaped like the parameter, as the Python classes make and check them.
            Extent::Param => StateShape::Param,
            _ => StateShape::Any,
        })
        .collect()
}

/// One optimizer step over a parameter group given as lists: `state` holds one
/// list per entry of `layout(kind, hyper)[0]`, `scalars` one per entry of
/// `layout(kind, hyper)[1]`, each aligned with `params`. Returns False (having
/// touched nothing) when some tensor needs torch's own implementation.
/// With `check_only` nothing runs: True when the call would be taken, False when it
/// would decline, the kernel's error for what it would refuse (a step count its
/// arithmetic cannot take); a caller making several calls checks them all before the
/// first writes.
#[pyfunction]
#[pyo3(signature = (kind, params, grads, state, scalars, hyper, *, num_threads=1, backend=None, stochastic_round=None, compensation=None, bf16_state=false, stream_ids=None, stream_offsets=None, check_only=false))]
#[allow(clippy::too_many_arguments)]
fn step<'py>(
    py: Python<'py>,
    kind: &str,
    params: &Bound<'py, PyList>,
    grads: &Bound<'py, PyList>,
    state: &Bound<'py, PyList>,
    scalars: &Bound<'py, PyList>,
    hyper: &Bound<'py, PyDict>,
    num_threads: usize,
    backend: Option<&str>,
    stochastic_round: Option<(u64, u64)>,
    compensation: Option<Bound<'py, PyList>>,
    bf16_state: bool,
    stream_ids: Option<Vec<u64>>,
    stream_offsets: Option<Vec<u64>>,
    check_only: bool,
) -> PyResult<bool> {
    let entry = entry(kind)?;
    let Some(configured) = configure(&entry, hyper)? else {
        return Ok(false);
    };
    let state_keys = configured.state_keys();
    let n = params.len();
    let columns = |lists: &Bound<'py, PyList>,
                   names: &[&str],
                   what: &str|
     -> PyResult<Vec<Vec<Bound<'py, PyAny>>>> {
        if lists.len() != names.len() {
            return Err(PyValueError::new_err(format!(
                "{kind} with these settings takes {what} {names:?}, got {} lists",
                lists.len()
            )));
        }
        let mut out = Vec::with_capacity(names.len());
        for (list, name) in lists.iter().zip(names) {
            let list = list.cast_into::<PyList>().map_err(|_| {
                PyValueError::new_err(format!("{kind}: {what} {name:?} must be a list of tensors"))
            })?;
            out.push(list.iter().collect::<Vec<_>>());
        }
        Ok(out)
    };
    let state_lists = columns(state, &state_keys, "state")?;
    let scalar_lists = columns(scalars, entry.scalars, "scalar state")?;
    let grads: Vec<Bound<'py, PyAny>> = grads.iter().collect();
    for (len, role) in std::iter::once((grads.len(), "grads"))
        .chain(state_lists.iter().map(|l| (l.len(), "state")))
        .chain(scalar_lists.iter().map(|l| (l.len(), "scalar state")))
    {
        if len != n {
            return Err(PyValueError::new_err(format!(
                "{kind}: expected {n} tensors in each list, got {len} {role}"
            )));
        }
    }
    if compensation.as_ref().is_some_and(|c| c.len() != n) {
        return Err(PyValueError::new_err(format!(
            "{kind}: expected {n} compensation tensors"
        )));
    }
    check_stream_ids(kind, stream_ids.as_deref(), n)?;
    if stream_offsets.as_ref().is_some_and(|at| at.len() != n) {
        return Err(PyValueError::new_err(format!(
            "{kind}: expected {n} stream offsets"
        )));
    }
    let exec = exec(num_threads, backend)?
        .with_rounding(rounding(stochastic_round, compensation.is_some())?);
    let mut gathered = Gathered::new(py, &entry, configured.as_ref(), bf16_state, n)?;
    gathered.offsets = stream_offsets.unwrap_or_default();
    for (i, param) in params.iter().enumerate() {
        let state: Vec<_> = state_lists.iter().map(|l| l[i].clone()).collect();
        let cells: Vec<_> = scalar_lists.iter().map(|l| l[i].clone()).collect();
        let comp = compensation.as_ref().map(|c| c.get_item(i)).transpose()?;
        if !gathered.push(None, &param, &grads[i], &state, &cells, comp.as_ref())? {
            return Ok(false);
        }
        gathered
            .streams
            .extend(stream_ids.as_ref().map(|ids| ids[i]));
    }
    let memos = (&mut DisjointMemo::default(), &mut DisjointMemo::default());
    if check_only {
        let Some(prepared) = gathered.prepare(&entry, exec, memos)? else {
            return Ok(false);
        };
        // The cells it reads must not be another thread's call's to write meanwhile: that call's
        // in-flight error, as the step itself would get.
        let _in_flight = inflight::enter(prepared.footprint()?).map_err(core_error)?;
        entry
            .check(configured.as_ref(), &prepared.batch, &prepared.scalars, exec)
            .map_err(core_error)?;
        return Ok(true);
    }
    if !gathered.run(&entry, configured.as_ref(), exec, memos)? {
        return Ok(false);
    }
    let mut written = vec![params.clone()];
    for list in state.iter().chain(scalars.iter()) {
        written.push(list.cast_into::<PyList>()?);
    }
    written.extend(compensation);
    bump_versions(py, &written.iter().collect::<Vec<_>>())?;
    Ok(true)
}

/// One optimizer step over a whole parameter group (`params`, its list), its
/// state read from the optimizer's `state` dict by the table's keys, tensor
/// descriptions cached in `cache` between steps. Parameters without a
/// gradient are skipped. Returns False (having touched nothing) when torch's
/// path must run: some parameter with a gradient lacks state (a first step), or
/// some tensor needs torch's own implementation.
#[pyfunction]
#[pyo3(signature = (kind, params, state, cache, hyper, *, num_threads=1, stochastic_round=None, kahan=false, bf16_state=false, stream_ids=None))]
#[allow(clippy::too_many_arguments)]
fn group_step<'py>(
    py: Python<'py>,
    kind: &str,
    params: &Bound<'py, PyList>,
    state: &Bound<'py, PyDict>,
    cache: &Bound<'py, TensorCache>,
    hyper: &Bound<'py, PyDict>,
    num_threads: usize,
    stochastic_round: Option<(u64, u64)>,
    kahan: bool,
    bf16_state: bool,
    stream_ids: Option<Vec<u64>>,
) -> PyResult<bool> {
    check_stream_ids(kind, stream_ids.as_deref(), params.len())?;
    let mut cache = TensorCache::borrow_for_step(cache)?;
    let rounding = rounding(stochastic_round, kahan)?;
    let comp_key = PyString::intern(py, KAHAN_COMP);
    let entry = entry(kind)?;
    let Some(configured) = configure(&entry, hyper)? else {
        return Ok(false);
    };
    // Interned once: a `&str` key would build a new Python string per lookup.
    let state_keys: Vec<Bound<'py, PyString>> = configured
        .state_keys()
        .iter()
        .map(|k| PyString::intern(py, k))
        .collect();
    let scalar_keys: Vec<Bound<'py, PyString>> = entry
        .scalars
        .iter()
        .map(|k| PyString::intern(py, k))
        .collect();
    let stateless = state_keys.is_empty() && scalar_keys.is_empty();
    let mut gathered = Gathered::new(py, &entry, configured.as_ref(), bf16_state, params.len())?;
    let empty = PyDict::new(py);
    // The state tensors the step writes: their version counters move, as torch's in-place ops move them.
    let written = PyList::empty(py);
    for (i, p) in params.iter().enumerate() {
        let grad = p.getattr(intern!(py, "grad"))?;
        if grad.is_none() {
            continue;
        }
        let entry_dict = match state.get_item(&p)? {
            Some(e) => match e.cast_into::<PyDict>() {
                Ok(d) => d,
                Err(_) => return Ok(false),
            },
            // Optimizers without state (SGD without momentum) never get an entry.
            None if stateless => empty.clone(),
            None => return Ok(false),
        };
        let (Some(tensors), Some(cells)) =
            (lookup(&entry_dict, &state_keys)?, lookup(&entry_dict, &scalar_keys)?)
        else {
            return Ok(false);
        };
        let comp = if kahan {
            match entry_dict.get_item(&comp_key)? {
                Some(t) => Some(t),
                None => return Ok(false),
            }
        } else {
            None
        };
        if !gathered.push(Some(&mut cache), &p, &grad, &tensors, &cells, comp.as_ref())? {
            return Ok(false);
        }
        for t in tensors.iter().chain(&cells).chain(&comp) {
            written.append(t)?;
        }
        gathered
            .streams
            .extend(stream_ids.as_ref().map(|ids| ids[i]));
    }
    let exec = exec(num_threads, None)?.with_rounding(rounding);
    if !gathered.run(
        &entry,
        configured.as_ref(),
        exec,
        cache.memos(params.as_any()),
    )? {
        return Ok(false);
    }
    bump_versions(py, &[&gathered.params, &written])?;
    Ok(true)
}

/// One call of [`groups_step`]: a table row with a group's settings, the
/// state keys its parameters' entries must hold, and what was gathered.
struct Part<'py> {
    entry: Entry,
    configured: Box<dyn Configured>,
    state_keys: Vec<Bound<'py, PyString>>,
    scalar_keys: Vec<Bound<'py, PyString>>,
    gathered: Gathered<'py>,
}

/// The tensors of `keys` in a state entry, or `None` when one is missing.
fn lookup<'py>(
    entry: &Bound<'py, PyDict>,
    keys: &[Bound<'py, PyString>],
) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        match entry.get_item(key)? {
            Some(t) => out.push(t),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// One step of every parameter group of an optimizer whose parameters take
/// different kernels by the layout of their state (8-bit state, and fp32
/// state under `min_8bit_size`), all or nothing. `groups` holds one
/// `(params, parts, stochastic_round, stream_ids)` per group; `parts` is a
/// list of `(kind, hyper)`, and each parameter with a gradient is stepped by
/// the first part whose state arrays and scalar cells its entry in `state`
/// holds (descriptions cached in `cache`, as `group_step`). Every group is
/// gathered and checked (dtypes, shapes, memory shared within a group) before
/// any is written; returns False, having touched nothing, when some parameter
/// with a gradient has no entry or no part takes it (the Python path then
/// makes the state or raises its error).
#[pyfunction]
#[pyo3(signature = (groups, state, cache, *, num_threads=1))]
fn groups_step<'py>(
    py: Python<'py>,
    groups: &Bound<'py, PyList>,
    state: &Bound<'py, PyDict>,
    cache: &Bound<'py, TensorCache>,
    num_threads: usize,
) -> PyResult<bool> {
    let mut cache = TensorCache::borrow_for_step(cache)?;
    // The state tensors the steps write: their version counters move, as torch's in-place ops move them.
    let written = PyList::empty(py);
    let mut calls: Vec<(Vec<Part<'py>>, oxoptim_core::Exec, usize)> = Vec::with_capacity(groups.len());
    for group in groups.iter() {
        #[allow(clippy::type_complexity)]
        let (params, parts, stochastic_round, stream_ids): (
            Bound<'py, PyList>,
            Bound<'py, PyList>,
            Option<(u64, u64)>,
            Option<Vec<u64>>,
        ) = group.extract()?;
        check_stream_ids("groups_step", stream_ids.as_deref(), params.len())?;
        let exec = exec(num_threads, None)?.with_rounding(rounding(stochastic_round, false)?);
        let mut group_parts = Vec::with_capacity(parts.len());
        for part in parts.iter() {
            let (kind, hyper): (String, Bound<'py, PyDict>) = part.extract()?;
            let entry = entry(&kind)?;
            let Some(configured) = configure(&entry, &hyper)? else {
                return Ok(false);
            };
            let intern = |keys: &[&str]| keys.iter().map(|k| PyString::intern(py, k)).collect();
            group_parts.push(Part {
                state_keys: intern(&configured.state_keys()),
                scalar_keys: intern(entry.scalars),
                gathered: Gathered::new(py, &entry, configured.as_ref(), false, params.len())?,
                entry,
                configured,
            });
        }
        for (i, p) in params.iter().enumerate() {
            let grad = p.getattr(intern!(py, "grad"))?;
            if grad.is_none() {
                continue;
            }
            let Some(Ok(entry_dict)) = state.get_item(&p)?.map(|e| e.cast_into::<PyDict>()) else {
                return Ok(false);
            };
            let mut placed = false;
            for part in group_parts.iter_mut() {
                let (Some(tensors), Some(cells)) = (
                    lookup(&entry_dict, &part.state_keys)?,
                    lookup(&entry_dict, &part.scalar_keys)?,
                ) else {
                    continue;
                };
                if !part.gathered.push(Some(&mut cache), &p, &grad, &tensors, &cells, None)? {
                    return Ok(false);
                }
                for t in tensors.iter().chain(&cells) {
                    written.append(t)?;
                }
                part.gathered.streams.extend(stream_ids.as_ref().map(|ids| ids[i]));
                placed = true;
                break;
            }
            if !placed {
                return Ok(false);
            }
        }
        calls.push((group_parts, exec, params.as_ptr() as usize));
    }
    // Every call checked before the first is run.
    let mut ready = Vec::new();
    for (parts, exec, key) in &calls {
        for (k, part) in parts.iter().enumerate() {
            if part.gathered.params.is_empty() {
                continue;
            }
            let Some(prepared) = part.gathered.prepare(&part.entry, *exec, cache.memos_at(key + k))? else {
                return Ok(false);
            };
            ready.push((part, *exec, prepared));
        }
    }
    // Each call proved its own arrays disjoint; registering them all in flight refuses one that
    // writes memory another touches (two parts or groups sharing memory, or another thread's
    // call): the Python path then runs, and refuses or steps them one call at a time.
    let mut in_flight = Vec::with_capacity(ready.len());
    for (_, _, prepared) in &ready {
        match inflight::enter(prepared.footprint()?) {
            Ok(guard) => in_flight.push(guard),
            Err(_) => return Ok(false),
        }
    }
    // What a kernel refuses (a step count its arithmetic cannot take), for every call before the
    // first writes: all or nothing.
    for (part, exec, prepared) in &ready {
        part.entry
            .check(part.configured.as_ref(), &prepared.batch, &prepared.scalars, *exec)
            .map_err(core_error)?;
    }
    for (part, exec, prepared) in ready {
        part.gathered.execute(&part.entry, part.configured.as_ref(), exec, prepared)?;
    }
    drop(in_flight);
    let mut lists: Vec<&Bound<'py, PyList>> = calls.iter().flat_map(|(parts, _, _)| parts.iter().map(|p| &p.gathered.params)).collect();
    lists.push(&written);
    bump_versions(py, &lists)?;
    Ok(true)
}

/// The state entry of a parameter's Kahan compensation (torch-optimi's name).
const KAHAN_COMP: &str = "kahan_comp";

/// The arrays a call takes: the optimizer's, with parameter-shaped state in
/// bfloat16 when `bf16_state` (state of another dtype makes torch's path run).
fn specs(configured: &dyn Configured, bf16_state: bool) -> Vec<ArraySpec> {
    let specs = configured.array_specs();
    if bf16_state {
        with_bf16_state(&specs)
    } else {
        specs
    }
}

/// `stream_ids`, when given, names one random stream per parameter.
fn check_stream_ids(kind: &str, stream_ids: Option<&[u64]>, n: usize) -> PyResult<()> {
    match stream_ids {
        Some(ids) if ids.len() != n => Err(PyValueError::new_err(format!(
            "{kind}: expected {n} stream ids, got {}",
            ids.len()
        ))),
        _ => Ok(()),
    }
}

/// The parameter rounding the keyword arguments ask for.
fn rounding(stochastic_round: Option<(u64, u64)>, kahan: bool) -> PyResult<ParamRounding> {
    match (stochastic_round, kahan) {
        (Some(_), true) => Err(PyValueError::new_err(
            "stochastic rounding and Kahan summation are alternatives; pick one",
        )),
        (Some((seed, count)), false) => Ok(ParamRounding::Stochastic { seed, count }),
        (None, true) => Ok(ParamRounding::Kahan),
        (None, false) => Ok(ParamRounding::Nearest),
    }
}

/// Whether the kernels of `kind` take these hyper-parameter values (else a
/// step declines and torch's implementation runs): what a caller that must
/// stay native checks before it steps anything.
#[pyfunction]
fn takes_hyper(kind: &str, hyper: &Bound<'_, PyDict>) -> PyResult<bool> {
    Ok(hyper_entries(&entry(kind)?, hyper, false)?.is_some())
}

/// The state a step of `kind` with these settings uses: its parameter-shaped
/// entries and its 0-d entries, each in the order `step` takes them.
#[pyfunction]
fn layout(
    kind: &str,
    hyper: &Bound<'_, PyDict>,
) -> PyResult<(Vec<&'static str>, Vec<&'static str>)> {
    let entry = entry(kind)?;
    let entries =
        hyper_entries(&entry, hyper, true)?.expect("lenient reading always gives entries");
    let configured = entry.configure(entries).map_err(core_error)?;
    Ok((configured.state_keys(), entry.scalars.to_vec()))
}

/// The table: for each optimizer name, its hyper-parameter keys (`hyper`),
/// every state array any setting uses (`state`), its 0-d state entries
/// (`scalars`), and whether a torch.optim class is its twin (`torch_twin`).
#[pyfunction]
fn optimizers(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let table = PyDict::new(py);
    for e in OPTIMIZERS {
        let row = PyDict::new(py);
        let hyper: Vec<&str> = e.hyper.iter().map(|(k, _)| *k).collect();
        row.set_item("hyper", PyTuple::new(py, hyper)?)?;
        row.set_item("state", PyTuple::new(py, e.state)?)?;
        row.set_item("scalars", PyTuple::new(py, e.scalars)?)?;
        row.set_item("torch_twin", e.torch_twin)?;
        table.set_item(e.name, row)?;
    }
    Ok(table)
}

/// Adds this file's functions to `oxoptim._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(step, m)?)?;
    m.add_function(wrap_pyfunction!(group_step, m)?)?;
    m.add_function(wrap_pyfunction!(groups_step, m)?)?;
    m.add_function(wrap_pyfunction!(layout, m)?)?;
    m.add_function(wrap_pyfunction!(takes_hyper, m)?)?;
    m.add_function(wrap_pyfunction!(optimizers, m)?)?;
    Ok(())
}
