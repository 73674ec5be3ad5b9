//! The multi-tensor engine shared by every optimizer: one call covers all
//! tensors of a parameter group; work is split by elements (not by tensor)
//! into fixed chunks that run on a pool of `threads` workers.
//!
//! Kernels are element-wise, so results do not depend on the split or the
//! thread count. Half-precision tensors are widened to f32 in small blocks,
//! updated with the f32 kernel, and rounded back (round-to-nearest-even).
//! Block-wise kernels ([`Blockwise`], e.g. 8-bit state with one scale per
//! block) get work split at whole blocks only, so they too give the same
//! bits whatever the split.

use crate::dispatch::{Backend, Element};
use crate::rounding::{self, ParamRounding};
use crate::storage::{Mem, ParamMem};
use crate::tensors::{ArraySpec, Column, DType, TensorBatch, MAX_ARITY};
use half::{bf16, f16};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Elements per work item: big enough to amortise scheduling, small enough
/// to balance a few large tensors across threads.
pub const CHUNK: usize = 1 << 15;
/// Below this many elements in a call, threads cost more than they save.
const PARALLEL_MIN: usize = 1 << 16;
/// Elements per widened block for bf16/f16 (stays in L1 with 6 arrays).
const HALF_BLOCK: usize = 1024;

/// An element-wise update of one slot's arrays, in batch arity order.
pub trait Elementwise: Sync {
    /// Updates `arrays` (all of equal length) of slot `slot`.
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]);

    /// Whether array `k` of a slot is written (read-only arrays skip the
    /// write-back after half-precision widening).
    fn writes(&self, k: usize) -> bool {
        let _ = k;
        true
    }

    /// Updates `n` elements of float32/bfloat16 `arrays` of slot `slot` in
    /// one pass, widening and rounding vector by vector ([`crate::storage`]);
    /// array 0 comes as `param`, stored with the call's rounding. Returns
    /// false, having touched nothing, when the kernel has no such path: the
    /// engine then widens the arrays into f32 blocks, runs
    /// [`Elementwise::apply`] and narrows them back, which gives the same bits.
    fn apply_fused(
        &self,
        backend: Backend,
        slot: usize,
        arrays: &[Mem],
        param: ParamMem,
        n: usize,
    ) -> bool {
        let _ = (backend, slot, arrays, param, n);
        false
    }
}

/// An update whose arrays need not all be shaped like the parameter (see
/// [`crate::tensors::ArraySpec`]) and which works on whole blocks of
/// [`Blockwise::BLOCK`] parameter elements, each independent of the others.
pub trait Blockwise: Sync {
    /// Parameter elements per block; work is split at multiples of it.
    const BLOCK: usize;
    /// Updates the arrays of slot `slot` for a whole number of blocks (the
    /// last one possibly short), each array as a slice of its own dtype.
    fn apply(&self, backend: Backend, slot: usize, columns: &mut [Column<'_>]);

    /// [`Blockwise::apply`] for the work item starting at parameter element
    /// `start` of the slot (what the engine calls; kernels whose result
    /// depends on the element index, such as stochastic rounding, override it).
    fn apply_at(&self, backend: Backend, slot: usize, start: usize, columns: &mut [Column<'_>]) {
        let _ = start;
        self.apply(backend, slot, columns)
    }
}

/// An update that needs a whole slot at once (reductions over rows, columns
/// or the whole tensor, as Adafactor's), each slot independent of the others.
pub trait PerSlot: Sync {
    /// Updates the arrays of slot `slot`, each as a slice of its own dtype.
    fn apply(&self, backend: Backend, slot: usize, columns: &mut [Column<'_>]);
}

/// How a call runs: which instruction set, how many threads, and how
/// bfloat16 parameters are stored back after their f32 update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    pub backend: Backend,
    pub threads: usize,
    pub rounding: ParamRounding,
}

impl Default for Exec {
    fn default() -> Self {
        Exec::new(Backend::active(), 1)
    }
}

impl Exec {
    pub fn new(backend: Backend, threads: usize) -> Exec {
        Exec {
            backend,
            threads: threads.max(1),
            rounding: ParamRounding::Nearest,
        }
    }

    pub fn with_rounding(self, rounding: ParamRounding) -> Exec {
        Exec { rounding, ..self }
    }
}

/// Runs `job(worker)` once on each of up to `threads` workers and returns when
/// all are done. Jobs pull work from a shared counter, so any number of
/// workers (even one) completes it.
pub type ParallelFor = fn(threads: usize, job: &(dyn Fn(usize) + Sync));

static PARALLEL_FOR: OnceLock<ParallelFor> = OnceLock::new();

/// Installs the worker team kernels run on (once per process; later calls are
/// ignored and return false). Without one, a rayon pool per thread count is
/// used. The Python bindings install torch's own OpenMP team, whose workers
/// otherwise keep spinning on the cores right after torch's ops.
pub fn set_parallel_for(f: ParallelFor) -> bool {
    PARALLEL_FOR.set(f).is_ok()
}

fn rayon_parallel_for(threads: usize, job: &(dyn Fn(usize) + Sync)) {
    pool(threads).broadcast(|ctx| job(ctx.index()));
}

/// Applies `f` to every item on `threads` workers (inline for small work).
pub(crate) fn for_each_item<T: Sync>(
    items: &[T],
    threads: usize,
    total_len: usize,
    f: impl Fn(&T) + Sync,
) {
    if threads <= 1 || total_len < PARALLEL_MIN || items.len() < 2 {
        items.iter().for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    let job = |_worker: usize| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        match items.get(i) {
            Some(item) => f(item),
            None => break,
        }
    };
    let parallel_for = PARALLEL_FOR.get().copied().unwrap_or(rayon_parallel_for);
    parallel_for(threads.min(items.len()), &job);
}

/// Runs `kernel` over every slot of `batch`.
pub fn run<K: Elementwise>(kernel: &K, batch: &TensorBatch, exec: Exec) {
    let items = work_items(batch, CHUNK);
    // State of another dtype than the parameter (bfloat16 state): every
    // array is widened to f32 by its own dtype.
    let mixed = batch.specs().iter().any(|s| *s != ArraySpec::LIKE_PARAM);
    for_each_item(
        &items,
        exec.threads,
        batch.total_len(),
        |&(slot, start, end)| {
            // SAFETY: work items never overlap, and the slot's dtype picks T
            // (the columns carry their own dtypes).
            unsafe {
                if mixed {
                    apply_columns(kernel, batch, exec, slot, start..end)
                } else {
                    apply_range(kernel, batch, exec, slot, start..end)
                }
            }
        },
    );
}

/// # Safety
/// No concurrent call may cover an overlapping `(slot, range)`.
unsafe fn apply_columns<K: Elementwise>(
    kernel: &K,
    batch: &TensorBatch,
    exec: Exec,
    slot: usize,
    range: std::ops::Range<usize>,
) {
    let at = Narrowing::new(exec, batch, slot, range.start);
    // SAFETY: disjointness is the caller's.
    unsafe {
        batch.with_compensation_slice(slot, range.clone(), |comp| {
            let mut comp = comp.filter(|_| exec.rounding == ParamRounding::Kahan);
            let len = range.len();
            batch.with_columns(slot, range, |columns| {
                let mut mems = [Mem::F32(std::ptr::null_mut()); MAX_ARITY];
                let all = columns.iter_mut().zip(mems.iter_mut()).all(|(c, m)| {
                    match c {
                        Column::F32(a) => Some(Mem::F32(a.as_mut_ptr())),
                        Column::BF16(a) => Some(Mem::BF16(a.as_mut_ptr() as *mut u16)),
                        _ => None,
                    }
                    .map(|mem| *m = mem)
                    .is_some()
                });
                let comp_at = comp.as_deref_mut().map(|c| c.as_mut_ptr() as *mut u16);
                if !(all && fused(kernel, at, &mems[..columns.len()], comp_at, len)) {
                    widened_columns(kernel, at, columns, comp)
                }
            })
        })
    }
}

impl Column<'_> {
    fn len(&self) -> usize {
        match self {
            Column::F32(a) => a.len(),
            Column::F64(a) => a.len(),
            Column::BF16(a) => a.len(),
            Column::F16(a) => a.len(),
            Column::U8(a) => a.len(),
        }
    }

    /// [`prefetch`] of elements `range`.
    fn prefetch(&self, range: std::ops::Range<usize>) {
        match self {
            Column::F32(a) => prefetch(&a[range]),
            Column::F64(a) => prefetch(&a[range]),
            Column::BF16(a) => prefetch(&a[range]),
            Column::F16(a) => prefetch(&a[range]),
            Column::U8(a) => prefetch(&a[range]),
        }
    }

    /// Elements `at..at + out.len()` as f32.
    fn widen_into(&self, backend: Backend, at: usize, out: &mut [f32]) {
        let range = at..at + out.len();
        match self {
            Column::F32(a) => out.copy_from_slice(&a[range]),
            Column::BF16(a) => rounding::widen_bf16(backend, &a[range], out),
            Column::F16(a) => out
                .iter_mut()
                .zip(&a[range])
                .for_each(|(o, x)| *o = x.to_f32()),
            _ => unreachable!("state of another dtype pairs float32/bfloat16/float16 arrays only"),
        }
    }

    /// Stores `src` into elements `at..`, rounded to nearest; the parameter
    /// (array 0) with the call's rounding.
    fn narrow_from(
        &mut self,
        backend: Backend,
        at: usize,
        src: &[f32],
        param: Option<(Narrowing, Option<&mut [bf16]>)>,
    ) {
        let range = at..at + src.len();
        match (self, param) {
            (Column::F32(a), _) => a[range].copy_from_slice(src),
            (Column::BF16(a), Some((narrowing, comp))) => {
                bf16::narrow_param(src, &mut a[range], narrowing, at, comp)
            }
            (Column::BF16(a), None) => rounding::narrow_bf16(backend, src, &mut a[range]),
            (Column::F16(a), _) => a[range]
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = f16::from_f32(*s)),
            _ => unreachable!("state of another dtype pairs float32/bfloat16/float16 arrays only"),
        }
    }
}

/// [`widened`] for arrays of several dtypes: each half-precision one widened
/// to f32 by its own; float32 ones (the parameter and gradient of bfloat16
/// state) are updated in place, not copied.
fn widened_columns<K: Elementwise>(
    kernel: &K,
    at: Narrowing,
    columns: &mut [Column<'_>],
    mut comp: Option<&mut [bf16]>,
) {
    let (len, arity) = (columns.first().map_or(0, Column::len), columns.len());
    let mut scratch = [[0f32; HALF_BLOCK]; MAX_ARITY];
    let mut start = 0;
    while start < len {
        let n = HALF_BLOCK.min(len - start);
        for (buf, column) in scratch.iter_mut().zip(columns.iter()) {
            if !matches!(column, Column::F32(_)) {
                column.widen_into(at.backend, start, &mut buf[..n]);
            }
        }
        let next = start + n..len.min(start + n + HALF_BLOCK);
        columns.iter().for_each(|c| c.prefetch(next.clone()));
        if let Some(c) = comp.as_deref() {
            prefetch(&c[next.clone()]);
        }
        {
            let mut views: [&mut [f32]; MAX_ARITY] = Default::default();
            for (v, (buf, column)) in views
                .iter_mut()
                .zip(scratch.iter_mut().zip(columns.iter_mut()))
            {
                *v = match column {
                    Column::F32(a) => &mut a[start..start + n],
                    _ => &mut buf[..n],
                };
            }
            kernel.apply::<f32>(at.backend, at.slot, &mut views[..arity]);
        }
        for (k, (buf, column)) in scratch.iter().zip(columns.iter_mut()).enumerate() {
            if !kernel.writes(k) || matches!(column, Column::F32(_)) {
                continue;
            }
            let param =
                (k == 0).then(|| (at, comp.as_deref_mut().map(|c| &mut c[start..start + n])));
            column.narrow_from(at.backend, start, &buf[..n], param);
        }
        start += n;
    }
}

/// Asks the CPU to start loading `data` into the cache: the next widened
/// block is fetched while the current one is computed (the widening loops
/// alone keep too few loads in flight to stream from memory at full speed).
#[inline(always)]
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (at, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
        for offset in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and `offset` lies inside `data` anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    at.add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Runs a block-wise `kernel` over every slot of `batch`, split at whole blocks.
pub fn run_blockwise<K: Blockwise>(kernel: &K, batch: &TensorBatch, exec: Exec) {
    let chunk = (CHUNK / K::BLOCK).max(1) * K::BLOCK;
    let items = work_items(batch, chunk);
    for_each_item(
        &items,
        exec.threads,
        batch.total_len(),
        |&(slot, start, end)| {
            // SAFETY: work items never overlap, and each starts on a block
            // boundary (a multiple of `chunk`) and ends on one or at the end.
            unsafe {
                batch.with_columns(slot, start..end, |columns| {
                    kernel.apply_at(exec.backend, slot, start, columns)
                })
            }
        },
    );
}

/// Runs a per-slot `kernel` over every slot of `batch`, one work item per
/// slot: each slot is computed by one thread in a fixed order, so results do
/// not depend on the thread count.
pub fn run_per_slot<K: PerSlot>(kernel: &K, batch: &TensorBatch, exec: Exec) {
    let slots: Vec<usize> = (0..batch.slots()).collect();
    for_each_item(&slots, exec.threads, batch.total_len(), |&slot| {
        let len = batch.slot(slot).len;
        // SAFETY: each slot is one work item, handed out once.
        unsafe {
            batch.with_columns(slot, 0..len, |columns| {
                kernel.apply(exec.backend, slot, columns)
            })
        }
    });
}

/// Splits every slot into chunks of at most `chunk` elements, each starting
/// at a multiple of `chunk`.
fn work_items(batch: &TensorBatch, chunk: usize) -> Vec<(usize, usize, usize)> {
    let mut items = Vec::with_capacity(batch.slots());
    for slot in 0..batch.slots() {
        let len = batch.slot(slot).len;
        let mut start = 0;
        while start < len {
            let end = (start + chunk).min(len);
            items.push((slot, start, end));
            start = end;
        }
    }
    items
}

/// # Safety
/// No concurrent call may cover an overlapping `(slot, range)`.
unsafe fn apply_range<K: Elementwise>(
    kernel: &K,
    batch: &TensorBatch,
    exec: Exec,
    slot: usize,
    range: std::ops::Range<usize>,
) {
    let backend = exec.backend;
    let at = Narrowing::new(exec, batch, slot, range.start);
    // SAFETY (each arm): T matches the slot's dtype; disjointness is the caller's.
    unsafe {
        match batch.slot(slot).dtype {
            DType::F32 => {
                batch.with_slices::<f32, _>(slot, range, |a| kernel.apply(backend, slot, a))
            }
            DType::F64 => {
                batch.with_slices::<f64, _>(slot, range, |a| kernel.apply(backend, slot, a))
            }
            DType::BF16 => batch.with_compensation_slice(slot, range.clone(), |comp| {
                let mut comp = comp.filter(|_| exec.rounding == ParamRounding::Kahan);
                let len = range.len();
                batch.with_slices::<bf16, _>(slot, range, |a| {
                    let mut mems = [Mem::F32(std::ptr::null_mut()); MAX_ARITY];
                    for (m, x) in mems.iter_mut().zip(a.iter_mut()) {
                        *m = Mem::BF16(x.as_mut_ptr() as *mut u16);
                    }
                    let comp_at = comp.as_deref_mut().map(|c| c.as_mut_ptr() as *mut u16);
                    if !fused(kernel, at, &mems[..a.len()], comp_at, len) {
                        widened(kernel, at, a, comp)
                    }
                })
            }),
            DType::F16 => {
                batch.with_slices::<f16, _>(slot, range, |a| widened(kernel, at, a, None))
            }
            DType::U8 => unreachable!("TensorBatch refuses parameters that are not floats"),
        }
    }
}

/// Runs a work item of `len` elements through [`Elementwise::apply_fused`],
/// in pieces that share the high 32 bits of their element index (stochastic
/// rounding's key); false when the kernel has no fused path.
fn fused<K: Elementwise>(
    kernel: &K,
    at: Narrowing,
    arrays: &[Mem],
    comp: Option<*mut u16>,
    len: usize,
) -> bool {
    let mut done = 0;
    loop {
        let index = (at.start + done) as u64;
        let n = (len - done).min(
            (((index >> 32) + 1) << 32)
                .wrapping_sub(index)
                .min(usize::MAX as u64) as usize,
        );
        let mut piece = [Mem::F32(std::ptr::null_mut()); MAX_ARITY];
        for (p, a) in piece.iter_mut().zip(arrays) {
            *p = a.offset(done);
        }
        let param = ParamMem::new(
            piece[0],
            at.rounding,
            comp.map(|c| c.wrapping_add(done)),
            at.stream,
            at.start + done,
        );
        if !kernel.apply_fused(at.backend, at.slot, &piece[..arrays.len()], param, n) {
            assert_eq!(done, 0, "a kernel has a fused path or not");
            return false;
        }
        done += n;
        if done >= len {
            return true;
        }
    }
}

/// Where a widened block lies and how its parameter is stored back.
#[derive(Clone, Copy)]
pub(crate) struct Narrowing {
    rounding: ParamRounding,
    backend: Backend,
    slot: usize,
    /// The slot's random stream ([`TensorBatch::stream`]).
    stream: usize,
    /// The stream element the work item starts at (the slot's offset plus its start in the slot).
    start: usize,
}

impl Narrowing {
    fn new(exec: Exec, batch: &TensorBatch, slot: usize, start: usize) -> Narrowing {
        Narrowing {
            rounding: exec.rounding,
            backend: exec.backend,
            slot,
            stream: batch.stream(slot),
            start: batch.offset(slot) + start,
        }
    }
}

/// A 16-bit float stored in memory and computed in f32.
pub(crate) trait HalfFloat: Copy {
    fn widen(self) -> f32;
    fn narrow(x: f32) -> Self;

    /// `src` widened into `dst`.
    fn widen_slice(backend: Backend, src: &[Self], dst: &mut [f32]) {
        let _ = backend;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.widen();
        }
    }

    /// `src` rounded to nearest into `dst`.
    fn narrow_slice(backend: Backend, src: &[f32], dst: &mut [Self]) {
        let _ = backend;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::narrow(*s);
        }
    }

    /// Stores the updated parameter `src` into `dst` (elements `at.start +
    /// offset ..` of the slot). Only bfloat16 takes a rounding other than
    /// nearest ([`crate::optimizer::Entry::step`] refuses the rest).
    fn narrow_param(
        src: &[f32],
        dst: &mut [Self],
        at: Narrowing,
        offset: usize,
        comp: Option<&mut [bf16]>,
    ) {
        let _ = (offset, comp);
        Self::narrow_slice(at.backend, src, dst)
    }
}

impl HalfFloat for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn widen_slice(backend: Backend, src: &[Self], dst: &mut [f32]) {
        rounding::widen_bf16(backend, src, dst)
    }
    fn narrow_slice(backend: Backend, src: &[f32], dst: &mut [Self]) {
        rounding::narrow_bf16(backend, src, dst)
    }
    fn narrow_param(
        src: &[f32],
        dst: &mut [Self],
        at: Narrowing,
        offset: usize,
        comp: Option<&mut [bf16]>,
    ) {
        match (at.rounding, comp) {
            (ParamRounding::Kahan, Some(comp)) => {
                for ((d, c), s) in dst.iter_mut().zip(comp.iter_mut()).zip(src) {
                    (*d, *c) = rounding::kahan_bf16(d.to_f32(), *s, c.to_f32());
                }
            }
            (ParamRounding::Stochastic { seed, count }, _) => rounding::narrow_stochastic(
                at.backend,
                src,
                dst,
                at.start + offset,
                (seed, count),
                at.stream,
            ),
            _ => rounding::narrow_bf16(at.backend, src, dst),
        }
    }
}

impl HalfFloat for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Runs the f32 kernel on widened copies of half-precision arrays.
fn widened<H: HalfFloat, K: Elementwise>(
    kernel: &K,
    at: Narrowing,
    arrays: &mut [&mut [H]],
    mut comp: Option<&mut [bf16]>,
) {
    let (backend, slot) = (at.backend, at.slot);
    let len = arrays.first().map_or(0, |a| a.len());
    let mut scratch = [[0f32; HALF_BLOCK]; MAX_ARITY];
    let mut start = 0;
    while start < len {
        let n = HALF_BLOCK.min(len - start);
        for (buf, src) in scratch.iter_mut().zip(arrays.iter()) {
            H::widen_slice(backend, &src[start..start + n], &mut buf[..n]);
        }
        let next = start + n..len.min(start + n + HALF_BLOCK);
        arrays.iter().for_each(|a| prefetch(&a[next.clone()]));
        if let Some(c) = comp.as_deref() {
            prefetch(&c[next.clone()]);
        }
        {
            let mut views: [&mut [f32]; MAX_ARITY] = Default::default();
            for (v, buf) in views.iter_mut().zip(scratch.iter_mut()) {
                *v = &mut buf[..n];
            }
            kernel.apply::<f32>(backend, slot, &mut views[..arrays.len()]);
        }
        for (k, (buf, dst)) in scratch.iter().zip(arrays.iter_mut()).enumerate() {
            if !kernel.writes(k) {
                continue;
            }
            if k == 0 {
                let comp = comp.as_deref_mut().map(|c| &mut c[start..start + n]);
                H::narrow_param(&buf[..n], &mut dst[start..start + n], at, start, comp);
            } else {
                H::narrow_slice(backend, &buf[..n], &mut dst[start..start + n]);
            }
        }
        start += n;
    }
}

/// A rayon pool per requested thread count, built once and kept.
fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
    type Pools = Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>>;
    static POOLS: OnceLock<Pools> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(n, _)| *n == threads) {
        return p.clone();
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("oxoptim-{i}"))
            .build()
            .expect("failed to start oxoptim worker threads"),
    );
    pools.push((threads, p.clone()));
    p
}
