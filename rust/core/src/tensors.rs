//! The one unsafe boundary: raw tensor memory handed over by a caller (the
//! Python bindings) becomes Rust slices here, after every check that makes
//! that sound.

use crate::error::{Error, Result};

/// Element type of a tensor's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    /// Bytes: codes of quantised state (never a parameter).
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// Whether parameters (and the kernels' arithmetic) may have this type.
    pub fn is_float(self) -> bool {
        !matches!(self, DType::U8)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U8 => "uint8",
        }
    }
}

/// How many elements an array of a slot has, relative to the slot's
/// parameter (array 0) of `n` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `n`: one element per parameter element.
    Param,
    /// `ceil(n / b)`: one element per block of `b` parameter elements (a
    /// block-wise scale such as 8-bit state's absmax).
    PerBlock(usize),
    /// Any length that divides `n` (a non-empty parameter) or any length (an
    /// empty one): a factor of the parameter's shape, such as Adafactor's
    /// row and column second moments, whose kernel checks the shapes agree.
    /// Handed out whole: only a slot's full range splits it.
    Factor,
}

impl Extent {
    /// Whether an array of `len` elements has this extent next to a
    /// parameter of `n` elements.
    pub fn admits_len(self, len: usize, n: usize) -> bool {
        match self {
            Extent::Param => len == n,
            Extent::PerBlock(b) => len == n.div_ceil(b),
            Extent::Factor => n == 0 || (len > 0 && n.is_multiple_of(len)),
        }
    }

    /// The elements of an array of `len` elements that belong to parameter
    /// elements `range` (whose start must be a block boundary, and whose end
    /// one too or `n`; the whole parameter for [`Extent::Factor`]).
    fn sub_range(
        self,
        range: &std::ops::Range<usize>,
        n: usize,
        len: usize,
    ) -> std::ops::Range<usize> {
        match self {
            Extent::Param => range.clone(),
            Extent::Factor => {
                assert!(
                    range.start == 0 && range.end == n,
                    "a factor array is handed out whole"
                );
                0..len
            }
            Extent::PerBlock(b) => {
                assert!(
                    range.start.is_multiple_of(b)
                        && (range.end.is_multiple_of(b) || range.end == n),
                    "a block-wise array is split at a block boundary only"
                );
                range.start / b..range.end.div_ceil(b)
            }
        }
    }
}

/// What one array of a slot holds: its element type (`None`: the
/// parameter's) and its length. Optimizers whose state is shaped like the
/// parameter use [`ArraySpec::LIKE_PARAM`] throughout; quantised or factored
/// state declares other types and extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArraySpec {
    pub dtype: Option<DType>,
    pub extent: Extent,
}

impl ArraySpec {
    pub const LIKE_PARAM: ArraySpec = ArraySpec {
        dtype: None,
        extent: Extent::Param,
    };

    pub const fn new(dtype: DType, extent: Extent) -> ArraySpec {
        ArraySpec {
            dtype: Some(dtype),
            extent,
        }
    }

    /// The dtype this array must have next to a parameter of `param` dtype.
    pub fn dtype_for(self, param: DType) -> DType {
        self.dtype.unwrap_or(param)
    }

    /// Whether `raw` fits this spec next to the parameter `param`.
    pub fn admits(self, raw: RawTensor, param: RawTensor) -> bool {
        raw.dtype == self.dtype_for(param.dtype) && self.extent.admits_len(raw.len, param.len)
    }
}

/// One array of a slot as a typed mutable slice (see [`TensorBatch::with_columns`]).
#[derive(Debug)]
pub enum Column<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    BF16(&'a mut [half::bf16]),
    F16(&'a mut [half::f16]),
    U8(&'a mut [u8]),
}

/// One contiguous tensor's memory: address, element count and element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawTensor {
    pub addr: usize,
    pub len: usize,
    pub dtype: DType,
}

impl RawTensor {
    pub(crate) fn byte_range(&self) -> (usize, usize) {
        (self.addr, self.addr + self.len * self.dtype.size())
    }
}

/// The tensors of one call: `slots` tensor slots (one per parameter), each
/// holding `arity` arrays (parameter, gradient, state...), row-major.
/// Every array is read and may be written by the kernel, unless the batch is
/// read-only ([`TensorBatch::new_read_only`]).
#[derive(Debug)]
pub struct TensorBatch {
    arrays: Vec<RawTensor>,
    arity: usize,
    /// What each array of a slot holds (all [`ArraySpec::LIKE_PARAM`] unless
    /// built by [`TensorBatch::with_specs`]).
    specs: Vec<ArraySpec>,
    /// Arrays may overlap, so only shared slices are ever handed out.
    read_only: bool,
    /// Kahan compensation arrays of bfloat16 parameters, one per slot,
    /// written by the engine only (empty unless [`TensorBatch::with_compensation`]).
    compensation: Vec<RawTensor>,
    /// The caller's id of each slot's random stream (stochastic rounding), so
    /// that a tensor draws the same bits whichever call, at whichever
    /// position, steps it; empty: the slot index ([`TensorBatch::with_streams`]).
    streams: Vec<u64>,
    /// Where each slot starts within its stream, in elements: a slot that is
    /// a piece of a larger tensor draws that tensor's bits (empty: 0).
    offsets: Vec<u64>,
}

impl TensorBatch {
    /// Checks a batch and takes it over.
    ///
    /// Checked here: `arrays.len()` is a multiple of `arity`; within a slot all
    /// arrays have the same length (else [`Error::Mismatch`]) and dtype (else
    /// [`Error::Unsupported`]); every non-empty array has a non-null address
    /// aligned for its dtype and an end that does not wrap; no two non-empty
    /// arrays overlap (so the `&mut` slices made later never alias).
    ///
    /// # Safety
    /// Each array must describe memory that is valid for reads and writes of
    /// `len * dtype.size()` bytes, holds initialised values of its dtype, and is
    /// not accessed by anyone else until the returned batch is dropped. (The
    /// bindings guarantee this from the tensors' device, dtype, contiguity and
    /// `data_ptr`, while holding references to them and their storages, and
    /// register the call in [`crate::inflight`] against other native calls.)
    pub unsafe fn new(arrays: Vec<RawTensor>, arity: usize) -> Result<TensorBatch> {
        // SAFETY: forwarded.
        unsafe { Self::new_memo(arrays, arity, &mut DisjointMemo::default()) }
    }

    /// [`TensorBatch::new`], skipping the O(n log n) overlap proof when `memo`
    /// proved this exact layout before (the proof depends on nothing else).
    ///
    /// # Safety
    /// As for [`TensorBatch::new`].
    pub unsafe fn new_memo(
        arrays: Vec<RawTensor>,
        arity: usize,
        memo: &mut DisjointMemo,
    ) -> Result<TensorBatch> {
        // SAFETY: forwarded.
        unsafe { Self::with_specs(arrays, &vec![ArraySpec::LIKE_PARAM; arity], memo) }
    }

    /// [`TensorBatch::new_memo`] for slots whose arrays are not all shaped
    /// like the parameter: array `k` of every slot must match `specs[k]`
    /// (its dtype, else [`Error::Unsupported`]; its length, else
    /// [`Error::Mismatch`]). `specs[0]` is the parameter itself, whose dtype
    /// must be a float.
    ///
    /// # Safety
    /// As for [`TensorBatch::new`].
    pub unsafe fn with_specs(
        arrays: Vec<RawTensor>,
        specs: &[ArraySpec],
        memo: &mut DisjointMemo,
    ) -> Result<TensorBatch> {
        let arity = specs.len();
        if specs.first() != Some(&ArraySpec::LIKE_PARAM) {
            return Err(Error::Mismatch(
                "array 0 of a slot is the parameter itself".to_string(),
            ));
        }
        check_slots(&arrays, specs)?;
        memo.check(&arrays, arity)?;
        Ok(TensorBatch {
            arrays,
            arity,
            specs: specs.to_vec(),
            read_only: false,
            compensation: Vec::new(),
            streams: Vec::new(),
            offsets: Vec::new(),
        })
    }

    /// What each array of a slot holds.
    pub fn specs(&self) -> &[ArraySpec] {
        &self.specs
    }

    /// A batch that is only read (reductions): checked as [`TensorBatch::new`]
    /// except that arrays may overlap (the same tensor listed twice), since
    /// shared reads never alias a write.
    ///
    /// # Safety
    /// As for [`TensorBatch::new`], with "valid for reads" only, and no one
    /// else writing the memory until the batch is dropped.
    pub unsafe fn new_read_only(arrays: Vec<RawTensor>, arity: usize) -> Result<TensorBatch> {
        let specs = vec![ArraySpec::LIKE_PARAM; arity];
        check_slots(&arrays, &specs)?;
        Ok(TensorBatch {
            arrays,
            arity,
            specs,
            read_only: true,
            compensation: Vec::new(),
            streams: Vec::new(),
            offsets: Vec::new(),
        })
    }

    /// Whether the batch was built by [`TensorBatch::new_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Every array, slot-major.
    pub fn arrays(&self) -> &[RawTensor] {
        &self.arrays
    }

    pub fn slots(&self) -> usize {
        self.arrays.len() / self.arity
    }

    pub fn arity(&self) -> usize {
        self.arity
    }

    /// Length and dtype of slot `slot` (shared by its arrays).
    pub fn slot(&self, slot: usize) -> RawTensor {
        self.arrays[slot * self.arity]
    }

    /// Names each slot's random stream (one id per slot; see `streams`).
    pub fn with_streams(mut self, streams: Vec<u64>) -> Result<TensorBatch> {
        if streams.len() != self.slots() {
            return Err(Error::Mismatch(format!(
                "{} stream ids for {} tensors",
                streams.len(),
                self.slots()
            )));
        }
        self.streams = streams;
        Ok(self)
    }

    /// The random stream of `slot`: the caller's id, or the slot index.
    pub fn stream(&self, slot: usize) -> usize {
        self.streams.get(slot).map_or(slot, |&id| id as usize)
    }

    /// Gives each slot the element of its stream it starts at (one per slot; see `offsets`).
    pub fn with_offsets(mut self, offsets: Vec<u64>) -> Result<TensorBatch> {
        if offsets.len() != self.slots() {
            return Err(Error::Mismatch(format!(
                "{} stream offsets for {} tensors",
                offsets.len(),
                self.slots()
            )));
        }
        // An element's index in its stream must not wrap (it keys its random bits).
        for (slot, &at) in offsets.iter().enumerate() {
            let len = self.slot(slot).len as u64;
            if at
                .checked_add(len)
                .is_none_or(|end| end > isize::MAX as u64)
            {
                return Err(Error::Mismatch(format!(
                    "stream offset {at} of tensor {slot} runs past the largest index"
                )));
            }
        }
        self.offsets = offsets;
        Ok(self)
    }

    /// The element of its stream that `slot` starts at.
    pub fn offset(&self, slot: usize) -> usize {
        self.offsets.get(slot).map_or(0, |&at| at as usize)
    }

    /// Adds a Kahan compensation array per slot: bfloat16, as long as the
    /// slot's parameter, disjoint from every array of the batch and each other.
    /// Kernels never see them; the engine's Kahan store reads and writes them.
    ///
    /// # Safety
    /// As for [`TensorBatch::new`], for each array of `compensation`.
    pub unsafe fn with_compensation(mut self, compensation: Vec<RawTensor>) -> Result<TensorBatch> {
        if self.read_only || compensation.len() != self.slots() {
            return Err(Error::Mismatch(format!(
                "{} compensation arrays for {} tensors",
                compensation.len(),
                self.slots()
            )));
        }
        let comp_specs = [ArraySpec::new(DType::BF16, Extent::Param)];
        for (slot, c) in compensation.iter().enumerate() {
            let param = self.slot(slot);
            if !comp_specs[0].admits(*c, param) {
                return Err(Error::Mismatch(format!(
                    "tensor {slot}: the compensation must be bfloat16 with the parameter's {} elements, got {} of {}",
                    param.len,
                    c.len,
                    c.dtype.name()
                )));
            }
        }
        check_slots(&compensation, &comp_specs)?;
        let mut all = self.arrays.clone();
        all.extend(compensation.iter().copied()); // shown as slots past the last tensor in messages
        check_disjoint(&all, self.arity)?;
        self.compensation = compensation;
        Ok(self)
    }

    /// The compensation arrays, one per slot (empty when the batch has none).
    pub fn compensation(&self) -> &[RawTensor] {
        &self.compensation
    }

    /// Hands `f` elements `range` of `slot`'s compensation array, or `None`
    /// when the batch has none.
    ///
    /// # Safety
    /// No other live call may cover an overlapping `(slot, range)`.
    pub(crate) unsafe fn with_compensation_slice<R>(
        &self,
        slot: usize,
        range: std::ops::Range<usize>,
        f: impl FnOnce(Option<&mut [half::bf16]>) -> R,
    ) -> R {
        let Some(c) = self.compensation.get(slot) else {
            return f(None);
        };
        assert!(range.start <= range.end && range.end <= c.len && c.dtype == DType::BF16);
        if range.is_empty() {
            return f(Some(&mut []));
        }
        // SAFETY: `with_compensation` checked the array (dtype, length,
        // alignment, non-null) and that it overlaps nothing else; the caller
        // keeps ranges handed out disjoint.
        let slice = unsafe {
            std::slice::from_raw_parts_mut(
                (c.addr as *mut half::bf16).add(range.start),
                range.len(),
            )
        };
        f(Some(slice))
    }

    /// Total elements over all slots.
    pub fn total_len(&self) -> usize {
        self.arrays.chunks(self.arity).map(|row| row[0].len).sum()
    }

    /// Hands `f` the arrays of `slot`, elements `range`, as typed mutable slices.
    ///
    /// Takes `&self`: callers on different threads must ask for disjoint
    /// `(slot, range)` pairs, which the engine's work split guarantees.
    /// Panics on a read-only batch (its arrays may alias).
    ///
    /// # Safety
    /// `T` must match the slot's dtype in size and representation, and no other
    /// live call may cover an overlapping `(slot, range)`.
    pub(crate) unsafe fn with_slices<T, R>(
        &self,
        slot: usize,
        range: std::ops::Range<usize>,
        f: impl FnOnce(&mut [&mut [T]]) -> R,
    ) -> R {
        assert!(
            !self.read_only,
            "a read-only batch hands out shared slices only"
        );
        assert!(
            self.specs.iter().all(|s| *s == ArraySpec::LIKE_PARAM),
            "arrays of other shapes or dtypes are handed out as columns"
        );
        let row = self.row(slot, &range, std::mem::size_of::<T>());
        let mut slices: [&mut [T]; MAX_ARITY] = Default::default();
        for (dst, a) in slices.iter_mut().zip(row) {
            if range.is_empty() {
                continue;
            }
            // SAFETY: `new` checked alignment, non-null and that arrays never
            // overlap; the caller's contract keeps the memory valid and the
            // ranges handed out disjoint, so these `&mut` never alias.
            *dst = unsafe {
                std::slice::from_raw_parts_mut((a.addr as *mut T).add(range.start), range.len())
            };
        }
        f(&mut slices[..self.arity])
    }

    /// Hands `f` the arrays of `slot`, elements `range`, as typed shared slices.
    ///
    /// # Safety
    /// `T` must match the slot's dtype in size and representation, and no live
    /// call may write an overlapping `(slot, range)`.
    pub(crate) unsafe fn with_read_slices<T, R>(
        &self,
        slot: usize,
        range: std::ops::Range<usize>,
        f: impl FnOnce(&[&[T]]) -> R,
    ) -> R {
        let row = self.row(slot, &range, std::mem::size_of::<T>());
        let mut slices: [&[T]; MAX_ARITY] = Default::default();
        for (dst, a) in slices.iter_mut().zip(row) {
            if range.is_empty() {
                continue;
            }
            // SAFETY: the constructor checked alignment and non-null; the
            // caller's contract keeps the memory valid and unwritten meanwhile,
            // so shared slices (even of overlapping arrays) are sound.
            *dst = unsafe {
                std::slice::from_raw_parts((a.addr as *const T).add(range.start), range.len())
            };
        }
        f(&slices[..self.arity])
    }

    /// Hands `f` the arrays of `slot` as typed mutable slices of their own
    /// dtypes, covering parameter elements `range`: an array of extent
    /// [`Extent::PerBlock`] gives the elements of the blocks `range` covers,
    /// so `range` must start on a block boundary and end on one or at the
    /// parameter's end.
    ///
    /// # Safety
    /// No other live call may cover an overlapping `(slot, range)`.
    pub(crate) unsafe fn with_columns<R>(
        &self,
        slot: usize,
        range: std::ops::Range<usize>,
        f: impl FnOnce(&mut [Column<'_>]) -> R,
    ) -> R {
        assert!(
            !self.read_only,
            "a read-only batch hands out shared slices only"
        );
        let row = &self.arrays[slot * self.arity..(slot + 1) * self.arity];
        let n = row[0].len;
        assert!(range.start <= range.end && range.end <= n);
        let mut columns: Vec<Column<'_>> = Vec::with_capacity(self.arity);
        for (a, spec) in row.iter().zip(&self.specs) {
            let sub = spec.extent.sub_range(&range, n, a.len);
            let len = sub.len();
            let addr = if len == 0 {
                std::ptr::NonNull::<f64>::dangling().as_ptr() as usize
            } else {
                a.addr + sub.start * a.dtype.size()
            };
            // SAFETY: the constructor checked each array against its spec
            // (length, dtype, alignment, non-null) and that arrays never
            // overlap; `sub` lies within the array; the caller keeps ranges
            // handed out disjoint, so these `&mut` never alias. An empty
            // slice gets a dangling address aligned for every dtype.
            unsafe {
                columns.push(match a.dtype {
                    DType::F32 => {
                        Column::F32(std::slice::from_raw_parts_mut(addr as *mut f32, len))
                    }
                    DType::F64 => {
                        Column::F64(std::slice::from_raw_parts_mut(addr as *mut f64, len))
                    }
                    DType::BF16 => {
                        Column::BF16(std::slice::from_raw_parts_mut(addr as *mut half::bf16, len))
                    }
                    DType::F16 => {
                        Column::F16(std::slice::from_raw_parts_mut(addr as *mut half::f16, len))
                    }
                    DType::U8 => Column::U8(std::slice::from_raw_parts_mut(addr as *mut u8, len)),
                });
            }
        }
        f(&mut columns)
    }

    /// The arrays of `slot`, after checking `range` and the element size.
    fn row(&self, slot: usize, range: &std::ops::Range<usize>, size: usize) -> &[RawTensor] {
        let row = &self.arrays[slot * self.arity..(slot + 1) * self.arity];
        assert!(range.start <= range.end && range.end <= row[0].len);
        assert_eq!(size, row[0].dtype.size());
        assert!(self.arity <= MAX_ARITY);
        row
    }
}

/// The per-array checks of [`TensorBatch::new`]: whole slots, one length and
/// dtype per slot, non-null aligned addresses whose ends do not wrap.
fn check_slots(arrays: &[RawTensor], specs: &[ArraySpec]) -> Result<()> {
    let arity = specs.len();
    if arity == 0 || !arrays.len().is_multiple_of(arity) {
        return Err(Error::Mismatch(format!(
            "{} arrays do not form whole slots of {arity}",
            arrays.len()
        )));
    }
    // A mixed-dtype slot is reported only when nothing else is wrong: torch
    // promotes types there (a float32 buffer of a float64 parameter stays
    // float32), so its own path must run, while a bad length is an error.
    let mut mixed = None;
    for (slot, row) in arrays.chunks(arity).enumerate() {
        let first = row[0];
        if !first.dtype.is_float() && mixed.is_none() {
            mixed = Some(format!(
                "tensor {slot}: a parameter of {} has no kernel",
                first.dtype.name()
            ));
        }
        for (k, (a, spec)) in row.iter().zip(specs).enumerate() {
            if !spec.extent.admits_len(a.len, first.len) {
                return Err(Error::Mismatch(format!(
                    "tensor {slot}: array {k} has {} elements of {} but the parameter's {} of {} call for {:?}",
                    a.len,
                    a.dtype.name(),
                    first.len,
                    first.dtype.name(),
                    spec.extent
                )));
            }
            let dtype = spec.dtype_for(first.dtype);
            if a.dtype != dtype && mixed.is_none() {
                mixed = Some(format!(
                    "tensor {slot}: array {k} is {} but should be {dtype} next to a {} parameter",
                    a.dtype.name(),
                    first.dtype.name(),
                    dtype = dtype.name()
                ));
            }
            if a.len == 0 {
                continue;
            }
            if a.addr == 0 || a.addr % a.dtype.size() != 0 {
                return Err(Error::BadAddress(format!(
                    "tensor {slot}: array {k} address {:#x} is null or not aligned for {}",
                    a.addr,
                    a.dtype.name()
                )));
            }
            let bytes = a.len.checked_mul(a.dtype.size());
            if bytes
                .and_then(|b| a.addr.checked_add(b))
                .is_none_or(|end| end > isize::MAX as usize)
            {
                return Err(Error::BadAddress(format!(
                    "tensor {slot}: array {k} extends past the address space"
                )));
            }
        }
    }
    mixed.map_or(Ok(()), |m| Err(Error::Unsupported(m)))
}

/// Per-parameter 0-d state (torch keeps the step counter, NAdam's
/// `mu_product`, ASGD's `eta` and `mu` each as a 0-d float32/float64
/// tensor): `per_slot` cells for every slot of a batch, slot-major, checked
/// like batch arrays and disjoint from them. Read and written only between
/// kernel runs, never by the parallel workers.
#[derive(Debug)]
pub struct ScalarState {
    cells: Vec<RawTensor>,
    per_slot: usize,
    slots: usize,
}

impl ScalarState {
    /// # Safety
    /// As for [`TensorBatch::new`], for each cell; `batch` must be the batch
    /// the cells belong to (their memory is checked to be disjoint from its
    /// arrays and its compensation arrays).
    pub unsafe fn new(
        cells: Vec<RawTensor>,
        per_slot: usize,
        batch: &TensorBatch,
    ) -> Result<ScalarState> {
        // SAFETY: forwarded.
        unsafe { Self::new_memo(cells, per_slot, batch, &mut DisjointMemo::default()) }
    }

    /// [`ScalarState::new`] with the overlap proof memoised as in [`TensorBatch::new_memo`].
    ///
    /// # Safety
    /// As for [`ScalarState::new`].
    pub unsafe fn new_memo(
        cells: Vec<RawTensor>,
        per_slot: usize,
        batch: &TensorBatch,
        memo: &mut DisjointMemo,
    ) -> Result<ScalarState> {
        if batch.read_only {
            return Err(Error::Mismatch(
                "scalar state belongs to a writable batch".to_string(),
            ));
        }
        if cells.len() != batch.slots() * per_slot {
            return Err(Error::Mismatch(format!(
                "{} scalar state cells for {} tensors of {per_slot} each",
                cells.len(),
                batch.slots()
            )));
        }
        for (i, c) in cells.iter().enumerate() {
            if c.len != 1 || !matches!(c.dtype, DType::F32 | DType::F64) {
                return Err(Error::Mismatch(format!(
                    "scalar state cell {i} must be one float32 or float64 element, got {} of {}",
                    c.len,
                    c.dtype.name()
                )));
            }
            if c.addr == 0 || c.addr % c.dtype.size() != 0 {
                return Err(Error::BadAddress(format!(
                    "scalar state cell {i} address {:#x} is null or misaligned",
                    c.addr
                )));
            }
        }
        if !cells.is_empty() {
            // The Kahan compensation arrays are written too: a cell inside one
            // would be updated through two aliases.
            let mut all = batch.arrays.clone();
            all.extend(batch.compensation.iter().copied());
            all.extend(cells.iter().copied()); // compensation and cells show up as slots past the last tensor in messages
            memo.check(&all, batch.arity)?;
        }
        Ok(ScalarState {
            cells,
            per_slot,
            slots: batch.slots(),
        })
    }

    /// The cells, slot-major (`per_slot` per slot).
    pub fn cells(&self) -> &[RawTensor] {
        &self.cells
    }

    pub fn per_slot(&self) -> usize {
        self.per_slot
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    fn cell(&self, slot: usize, k: usize) -> RawTensor {
        assert!(
            slot < self.slots && k < self.per_slot,
            "scalar state index out of range"
        );
        self.cells[slot * self.per_slot + k]
    }

    /// Cell `k` of `slot`, widened to f64 (torch's `.item()`).
    pub fn get(&self, slot: usize, k: usize) -> f64 {
        let c = self.cell(slot, k);
        // SAFETY: `new` checked each cell is one aligned element of its dtype,
        // disjoint from everything else in the call; the caller's contract
        // keeps it valid.
        unsafe {
            match c.dtype {
                DType::F32 => *(c.addr as *const f32) as f64,
                _ => *(c.addr as *const f64),
            }
        }
    }

    /// Stores `value` rounded to the cell's dtype (torch's `copy_` of a
    /// Python float) and returns what was stored.
    pub fn set(&mut self, slot: usize, k: usize, value: f64) -> f64 {
        let c = self.cell(slot, k);
        // SAFETY: as in `get`; `&mut self` keeps writes from racing reads.
        unsafe {
            match c.dtype {
                DType::F32 => {
                    let p = c.addr as *mut f32;
                    *p = value as f32;
                    *p as f64
                }
                _ => {
                    *(c.addr as *mut f64) = value;
                    value
                }
            }
        }
    }

    /// `cell += 1` in the cell's own dtype (torch's `step_t += 1`); returns the new value.
    pub fn increment(&mut self, slot: usize, k: usize) -> f64 {
        let next = self.incremented(slot, k);
        self.set(slot, k, next)
    }

    /// What [`ScalarState::increment`] would store, without storing it.
    pub fn incremented(&self, slot: usize, k: usize) -> f64 {
        match self.cell(slot, k).dtype {
            DType::F32 => (self.get(slot, k) as f32 + 1.0) as f64,
            _ => self.get(slot, k) + 1.0,
        }
    }

    /// `cell *= factor` as torch's in-place multiply by a Python float: the
    /// factor is rounded to the cell's dtype first. Returns the new value.
    pub fn scale(&mut self, slot: usize, k: usize, factor: f64) -> f64 {
        let next = self.scaled(slot, k, factor);
        self.set(slot, k, next)
    }

    /// What [`ScalarState::scale`] would store, without storing it.
    pub fn scaled(&self, slot: usize, k: usize, factor: f64) -> f64 {
        let old = self.get(slot, k);
        match self.cell(slot, k).dtype {
            // The product of two f32 values is exact in f64, so one rounding
            // to f32 gives the f32 product.
            DType::F32 => ((old * (factor as f32) as f64) as f32) as f64,
            _ => old * factor,
        }
    }
}

/// Most arrays one slot may have (AMSGrad Adam uses five).
pub const MAX_ARITY: usize = 6;

/// The last array layout proven free of overlaps.
#[derive(Debug, Default)]
pub struct DisjointMemo {
    proven: Vec<RawTensor>,
}

impl DisjointMemo {
    fn check(&mut self, arrays: &[RawTensor], arity: usize) -> Result<()> {
        if self.proven.as_slice() == arrays {
            return Ok(());
        }
        self.proven.clear();
        check_disjoint(arrays, arity)?;
        self.proven.extend_from_slice(arrays);
        Ok(())
    }
}

fn check_disjoint(arrays: &[RawTensor], arity: usize) -> Result<()> {
    let mut spans: Vec<(usize, usize, usize)> = arrays
        .iter()
        .enumerate()
        .filter(|(_, a)| a.len > 0)
        .map(|(i, a)| {
            let (s, e) = a.byte_range();
            (s, e, i)
        })
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let (_, end_a, ia) = pair[0];
        let (start_b, _, ib) = pair[1];
        if start_b < end_a {
            return Err(Error::Overlap(format!(
                "tensor {} array {} and tensor {} array {} share memory; one optimizer call needs distinct tensors",
                ia / arity,
                ia % arity,
                ib / arity,
                ib % arity
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(addr: usize, len: usize) -> RawTensor {
        RawTensor {
            addr,
            len,
            dtype: DType::F32,
        }
    }

    #[test]
    fn rejects_overlap_length_and_alignment() {
        // SAFETY: these batches are never turned into slices.
        unsafe {
            assert!(matches!(
                TensorBatch::new(vec![t(64, 4), t(72, 4)], 2),
                Err(Error::Overlap(_))
            ));
            assert!(matches!(
                TensorBatch::new(vec![t(64, 4), t(128, 3)], 2),
                Err(Error::Mismatch(_))
            ));
            assert!(matches!(
                TensorBatch::new(vec![t(66, 4), t(128, 4)], 2),
                Err(Error::BadAddress(_))
            ));
            assert!(matches!(
                TensorBatch::new(vec![t(0, 4), t(128, 4)], 2),
                Err(Error::BadAddress(_))
            ));
            assert!(matches!(
                TensorBatch::new(vec![t(64, 1)], 2),
                Err(Error::Mismatch(_))
            ));
            // Adjacent and empty arrays are fine.
            assert!(TensorBatch::new(vec![t(64, 4), t(80, 4), t(0, 0), t(0, 0)], 2).is_ok());
        }
    }

    #[test]
    fn mixed_dtypes_are_unsupported_but_bad_lengths_are_errors() {
        let f64_at = |addr, len| RawTensor {
            addr,
            len,
            dtype: DType::F64,
        };
        // SAFETY: these batches are never turned into slices.
        unsafe {
            assert!(matches!(
                TensorBatch::new(vec![f64_at(64, 4), t(128, 4)], 2),
                Err(Error::Unsupported(_))
            ));
            // A length mismatch anywhere wins over a mixed slot elsewhere.
            let r = TensorBatch::new(vec![f64_at(64, 4), t(128, 4), t(256, 4), t(512, 3)], 2);
            assert!(matches!(r, Err(Error::Mismatch(_))));
            assert!(matches!(
                TensorBatch::new_read_only(vec![f64_at(64, 4), t(128, 4)], 2),
                Err(Error::Unsupported(_))
            ));
        }
    }

    #[test]
    fn read_only_batches_may_overlap_and_hand_out_shared_slices_only() {
        let mut data = [1.0f32, 2.0, 3.0, 4.0];
        let a = RawTensor {
            addr: data.as_mut_ptr() as usize,
            len: 4,
            dtype: DType::F32,
        };
        // SAFETY: `data` outlives the batches; nothing writes it meanwhile.
        unsafe {
            assert!(matches!(
                TensorBatch::new(vec![a, a], 1),
                Err(Error::Overlap(_))
            ));
            let batch = TensorBatch::new_read_only(vec![a, a], 1).unwrap();
            assert!(batch.is_read_only());
            let sums: Vec<f32> = (0..2)
                .map(|slot| batch.with_read_slices::<f32, _>(slot, 0..4, |s| s[0].iter().sum()))
                .collect();
            assert_eq!(sums, [10.0, 10.0]);
            let writable = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                batch.with_slices::<f32, _>(0, 0..4, |_| ())
            }));
            assert!(
                writable.is_err(),
                "a read-only batch handed out &mut slices"
            );
            assert!(matches!(
                ScalarState::new(vec![t(4096, 1)], 1, &batch),
                Err(Error::Mismatch(_))
            ));
        }
    }

    #[test]
    fn memo_skips_only_a_layout_it_proved() {
        let mut memo = DisjointMemo::default();
        // SAFETY: test batches are only checked, never turned into slices.
        unsafe {
            assert!(TensorBatch::new_memo(vec![t(64, 4), t(128, 4)], 2, &mut memo).is_ok());
            assert!(TensorBatch::new_memo(vec![t(64, 4), t(128, 4)], 2, &mut memo).is_ok());
            assert!(matches!(
                TensorBatch::new_memo(vec![t(64, 4), t(72, 4)], 2, &mut memo),
                Err(Error::Overlap(_))
            ));
            // A failed proof is not remembered.
            assert!(matches!(
                TensorBatch::new_memo(vec![t(64, 4), t(72, 4)], 2, &mut memo),
                Err(Error::Overlap(_))
            ));
        }
    }

    #[test]
    fn scalar_state_works_in_each_cells_dtype_and_stays_disjoint() {
        let mut p = [1.0f32; 4];
        let mut step32 = [0.0f32];
        let mut mu64 = [1.0f64];
        let raw = |addr: usize, len: usize, dtype: DType| RawTensor { addr, len, dtype };
        // SAFETY: the arrays outlive the batch and the state and nothing else touches them.
        unsafe {
            let batch =
                TensorBatch::new(vec![raw(p.as_mut_ptr() as usize, 4, DType::F32)], 1).unwrap();
            let cells = vec![
                raw(step32.as_mut_ptr() as usize, 1, DType::F32),
                raw(mu64.as_mut_ptr() as usize, 1, DType::F64),
            ];
            let mut s = ScalarState::new(cells, 2, &batch).unwrap();
            assert_eq!(s.increment(0, 0), 1.0);
            assert_eq!(s.scale(0, 1, 0.1), 0.1);
            assert_eq!(s.set(0, 0, 0.1), 0.1f32 as f64);
            assert_eq!(s.get(0, 0), 0.1f32 as f64);
            // In an f32 cell the factor is rounded to f32 first and the product is
            // the f32 product (0.9 is a factor where rounding only at the end differs).
            assert_ne!((0.1f32 as f64 * 0.9) as f32, 0.1f32 * 0.9f32);
            assert_eq!(s.scale(0, 0, 0.9), (0.1f32 * 0.9f32) as f64);
            // A cell inside a batch array, or of the wrong size, is refused.
            let inside = vec![raw(p.as_mut_ptr() as usize + 4, 1, DType::F32)];
            assert!(matches!(
                ScalarState::new(inside, 1, &batch),
                Err(Error::Overlap(_))
            ));
            let long = vec![raw(mu64.as_mut_ptr() as usize, 2, DType::F64)];
            assert!(matches!(
                ScalarState::new(long, 1, &batch),
                Err(Error::Mismatch(_))
            ));
            assert!(matches!(
                ScalarState::new(vec![], 1, &batch),
                Err(Error::Mismatch(_))
            ));
        }
        assert_eq!((step32[0], mu64[0]), (0.1f32 * 0.9f32, 0.1));
    }

    #[test]
    fn a_cell_inside_a_compensation_array_is_an_overlap() {
        let raw = |addr: usize, len: usize, dtype: DType| RawTensor { addr, len, dtype };
        // SAFETY: test batches are only checked, never turned into slices.
        unsafe {
            let batch = TensorBatch::new(
                vec![raw(4096, 8, DType::BF16), raw(8192, 8, DType::BF16)],
                2,
            )
            .unwrap()
            .with_compensation(vec![raw(16384, 8, DType::BF16)])
            .unwrap();
            assert!(matches!(
                ScalarState::new(vec![raw(16384, 1, DType::F32)], 1, &batch),
                Err(Error::Overlap(_))
            ));
            assert!(ScalarState::new(vec![raw(16400, 1, DType::F32)], 1, &batch).is_ok());
        }
    }

    #[test]
    fn overlap_found_even_when_a_long_array_covers_later_ones() {
        // [64, 464) covers [96, 112) and [200, 216), both of another slot.
        // SAFETY: test batches are only checked, never turned into slices.
        unsafe {
            let r = TensorBatch::new(vec![t(64, 100), t(1000, 100), t(96, 4), t(200, 4)], 2);
            assert!(matches!(r, Err(Error::Overlap(_))));
        }
    }
}
