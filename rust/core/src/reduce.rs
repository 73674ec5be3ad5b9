//! Deterministic parallel reductions over a batch: sums of squares, p-norms,
//! maximum magnitude, any-non-finite, and the squared norm of a subgradient
//! direction.
//!
//! Every slot is cut into fixed blocks of [`BLOCK`] elements (independent of
//! the thread count). Inside a block, element `i` is folded into virtual lane
//! `i % 16` — one `f32`/`f64` accumulator per lane, in element order, the
//! same for every instruction set since each vector width divides 16 — the
//! 16 lanes are then added in order in f64, and the per-block results are
//! added in slot and block order in f64. The result is therefore
//! bit-identical whatever the thread count and the SIMD backend.
//! Half-precision tensors are widened to f32 per block. Reductions only read,
//! so they also take read-only batches (the same tensor listed twice).

use crate::dispatch::{Backend, Element, WithLanes};
use crate::engine::{self, Exec};
use crate::error::{Error, Result};
use crate::kernels::subgradient::direction;
use crate::simd::{Lanes, Scalar};
use crate::tensors::{DType, TensorBatch};
use half::{bf16, f16};
use std::sync::atomic::{AtomicU64, Ordering};

/// Elements per reduction block (a multiple of [`VIRTUAL_LANES`]).
pub const BLOCK: usize = 2048;
/// Accumulators per block; every backend's vector width divides it.
pub const VIRTUAL_LANES: usize = 16;
/// f32's smallest normal, widened: below it an f32 `pow` loses digits or flushes to 0.
const F32_MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;

/// What to compute over every element of a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduction {
    /// Σ|x| over arity-1 slots.
    SumAbs,
    /// Σx² over arity-1 slots.
    SumSquares,
    /// max |x| over arity-1 slots (NaN wins).
    MaxAbs,
    /// Σ|x|^p over arity-1 slots, accumulated in f64.
    SumPow(f64),
    /// Σ|x|^p as [`SumPow`](Reduction::SumPow), except that in slots torch
    /// reduces in f32 (f32, bf16, f16) a term outside f32's normal range
    /// takes f32's rounding, as torch's f32 `pow` gives it: +inf above f32's
    /// maximum, a subnormal or 0 below its smallest normal. Terms inside it
    /// stay exact (no per-term cost but one comparison).
    SumPowTorch(f64),
    /// 1.0 when some element of an arity-1 batch is NaN or ±inf, else 0.0.
    AnyNonfinite,
    /// Σd² over `[param, grad]` slots, with d the subgradient direction
    /// `±g + weight_decay·θ + l1·sign(θ)` exactly as the step computes it.
    DirectionSquares {
        l1: f64,
        weight_decay: f64,
        maximize: bool,
    },
}

impl Reduction {
    fn arity(self) -> usize {
        match self {
            Reduction::DirectionSquares { .. } => 2,
            _ => 1,
        }
    }

    fn is_max(self) -> bool {
        matches!(self, Reduction::MaxAbs)
    }
}

/// Runs `reduction` over every element of `batch`.
pub fn reduce(reduction: Reduction, batch: &TensorBatch, exec: Exec) -> Result<f64> {
    if batch.arity() != reduction.arity() {
        return Err(Error::Mismatch(format!(
            "{reduction:?} expects {} arrays per tensor, got {}",
            reduction.arity(),
            batch.arity()
        )));
    }
    if let Reduction::SumPow(p) | Reduction::SumPowTorch(p) = reduction {
        if !(p.is_finite() && p > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "SumPow needs a finite positive exponent, got {p}"
            )));
        }
    }
    let items = blocks(batch);
    let process = |&(slot, start, end): &(usize, usize, usize)| {
        // SAFETY: the slot's dtype picks T; reductions only read, and blocks never overlap.
        unsafe { reduce_range(reduction, batch, exec.backend, slot, start..end) }
    };
    // One slot per block, filled by whichever worker takes the block, then
    // combined in block order: the result does not depend on the workers.
    let partial: Vec<AtomicU64> = items.iter().map(|_| AtomicU64::new(0)).collect();
    let indexed: Vec<usize> = (0..items.len()).collect();
    engine::for_each_item(&indexed, exec.threads, batch.total_len(), |&i| {
        partial[i].store(process(&items[i]).to_bits(), Ordering::Relaxed)
    });
    let out = partial
        .into_iter()
        .map(|x| f64::from_bits(x.into_inner()))
        .fold(0.0, |acc, x| combine(reduction, acc, x));
    Ok(match reduction {
        Reduction::AnyNonfinite => (out.is_nan() as u8) as f64,
        _ => out,
    })
}

/// The p-norm of all elements of an arity-1 batch, as if concatenated:
/// `p` = 1, 2, ∞ or any finite `p > 0`.
pub fn norm(p: f64, batch: &TensorBatch, exec: Exec) -> Result<f64> {
    if p == 1.0 {
        reduce(Reduction::SumAbs, batch, exec)
    } else if p == 2.0 {
        Ok(reduce(Reduction::SumSquares, batch, exec)?.sqrt())
    } else if p == f64::INFINITY {
        reduce(Reduction::MaxAbs, batch, exec)
    } else if p.is_finite() && p > 0.0 {
        Ok(reduce(Reduction::SumPow(p), batch, exec)?.powf(1.0 / p))
    } else {
        Err(Error::InvalidArgument(format!(
            "norm type {p} is not supported (1, 2, inf or a finite p > 0)"
        )))
    }
}

/// The p-norm of an arity-1 batch of one dtype as torch's
/// `clip_grad_norm_` / `get_total_norm` gives it where its arithmetic leaves
/// the range of the dtype it reduces in (f32 for f32, bf16 and f16 tensors;
/// f64 for f64): `p` = 1, 2, ∞ or any finite `p > 0`.
///
/// Torch takes the norm of every tensor (`vector_norm`: Σ|x|^p accumulated in
/// f32 for the three f32-reduced dtypes, each |x|^p an f32 `pow`; a tensor of
/// one element is its |x|, exactly), then the norm of the stacked per-tensor
/// norms (again |n| when there is one tensor). Inside f32's range the result
/// is [`norm`]'s (exact terms, f64 sums); outside it, as torch's:
///
/// * one tensor of one element: |x|, whatever `p` (no |x|^p to overflow or
///   underflow);
/// * a term |x|^p (general p) above f32's maximum is +inf, one below f32's
///   smallest normal takes f32's rounding (subnormal or 0) — what makes
///   p = 1000 of `[2, 2]` inf, and p = 3 of values near 1e-20 zero. A tensor
///   of one element among several meets the same f32 `pow` in the second
///   stage, so its term is treated alike;
/// * a sum Σ|x|^p (p = 1, 2, general) that f32 rounds to +inf makes the norm
///   +inf. Every per-tensor sum is at most this one sum over all elements and
///   the second stage's sum over the per-tensor norms equals it up to
///   rounding, so one check per batch decides both stages. For p = 2 the
///   squares themselves are already f32 (the f32 lanes of [`reduce`]).
///
/// A norm beyond the dtype's maximum (p < 1 in f32; any p in f16) becomes
/// +inf when the caller rounds the result to the dtype, as torch rounds it.
/// f64 tensors need nothing more than the one-element case: [`norm`]'s f64
/// arithmetic is torch's range. Batches mixing f64 with other dtypes are
/// refused (torch reduces each dtype on its own).
pub fn torch_norm(p: f64, batch: &TensorBatch, exec: Exec) -> Result<f64> {
    if batch.arity() == 1 && batch.slots() == 1 && batch.slot(0).len == 1 && p > 0.0 {
        return reduce(Reduction::MaxAbs, batch, exec); // |x|, exactly
    }
    let f64_slots = (0..batch.slots())
        .filter(|&i| batch.slot(i).dtype == DType::F64)
        .count();
    if f64_slots == batch.slots() {
        return norm(p, batch, exec);
    }
    if f64_slots != 0 {
        return Err(Error::InvalidArgument(
            "torch_norm takes tensors of one dtype (f64 mixed with another)".into(),
        ));
    }
    let reduction = if p == 1.0 {
        Reduction::SumAbs
    } else if p == 2.0 {
        Reduction::SumSquares
    } else if p == f64::INFINITY {
        return reduce(Reduction::MaxAbs, batch, exec); // max |x|: exact in any dtype
    } else if p.is_finite() && p > 0.0 {
        Reduction::SumPowTorch(p)
    } else {
        return Err(Error::InvalidArgument(format!(
            "norm type {p} is not supported (1, 2, inf or a finite p > 0)"
        )));
    };
    let sum = reduce(reduction, batch, exec)?;
    if (sum as f32).is_infinite() {
        return Ok(f64::INFINITY); // torch's f32 accumulator overflows (NaN is not infinite)
    }
    Ok(match reduction {
        Reduction::SumAbs => sum,
        Reduction::SumSquares => sum.sqrt(),
        _ => sum.powf(1.0 / p),
    })
}

/// Whether any element of an arity-1 batch is NaN or ±inf (one read pass).
pub fn any_nonfinite(batch: &TensorBatch, exec: Exec) -> Result<bool> {
    Ok(reduce(Reduction::AnyNonfinite, batch, exec)? != 0.0)
}

#[inline(always)]
fn combine(reduction: Reduction, acc: f64, x: f64) -> f64 {
    if reduction.is_max() {
        if x > acc || x.is_nan() {
            x
        } else {
            acc
        }
    } else {
        acc + x
    }
}

/// Every slot cut into blocks of [`BLOCK`] elements, in slot order.
fn blocks(batch: &TensorBatch) -> Vec<(usize, usize, usize)> {
    let mut items = Vec::new();
    for slot in 0..batch.slots() {
        let len = batch.slot(slot).len;
        let mut start = 0;
        while start < len {
            let end = (start + BLOCK).min(len);
            items.push((slot, start, end));
            start = end;
        }
    }
    items
}

/// # Safety
/// `T` is picked from the slot's dtype; no concurrent writer may cover the range.
unsafe fn reduce_range(
    reduction: Reduction,
    batch: &TensorBatch,
    backend: Backend,
    slot: usize,
    range: std::ops::Range<usize>,
) -> f64 {
    // SAFETY (each arm): T matches the slot's dtype; the slices are only read.
    unsafe {
        match batch.slot(slot).dtype {
            DType::F32 => batch.with_read_slices::<f32, _>(slot, range, |a| {
                reduce_slices(reduction, backend, a[0], a.get(1).copied())
            }),
            DType::F64 => batch.with_read_slices::<f64, _>(slot, range, |a| {
                reduce_slices(reduction, backend, a[0], a.get(1).copied())
            }),
            DType::BF16 => batch.with_read_slices::<bf16, _>(slot, range, |a| {
                widened(reduction, backend, a, |h: bf16| h.to_f32())
            }),
            DType::F16 => batch.with_read_slices::<f16, _>(slot, range, |a| {
                widened(reduction, backend, a, |h: f16| h.to_f32())
            }),
            DType::U8 => unreachable!("TensorBatch refuses parameters that are not floats"),
        }
    }
}

/// Reduces one block of half-precision arrays through f32 copies.
fn widened<H: Copy>(
    reduction: Reduction,
    backend: Backend,
    arrays: &[&[H]],
    widen: impl Fn(H) -> f32,
) -> f64 {
    let n = arrays[0].len();
    debug_assert!(n <= BLOCK);
    let mut scratch = [[0f32; BLOCK]; 2];
    for (buf, src) in scratch.iter_mut().zip(arrays.iter()) {
        for (d, s) in buf[..n].iter_mut().zip(src.iter()) {
            *d = widen(*s);
        }
    }
    let [a, b] = &scratch;
    reduce_slices(
        reduction,
        backend,
        &a[..n],
        (arrays.len() == 2).then(|| &b[..n]),
    )
}

/// Reduces one block (at most [`BLOCK`] elements) on `backend`.
fn reduce_slices<T: Element>(
    reduction: Reduction,
    backend: Backend,
    a: &[T],
    b: Option<&[T]>,
) -> f64 {
    if let Reduction::SumPow(p) | Reduction::SumPowTorch(p) = reduction {
        // No vector pow: accumulate |x|^p in f64, same lanes and order as the vector reductions.
        let as_torch = matches!(reduction, Reduction::SumPowTorch(_));
        let mut lanes = [0f64; VIRTUAL_LANES];
        for (i, x) in a.iter().enumerate() {
            let mut term = x.to_f64().abs().powf(p);
            if as_torch {
                // T's rounding where T's normal range cannot hold the term: T is
                // f32 for every f32-reduced dtype (halves arrive widened); for
                // T = f64 the rounding is the identity.
                let rounded = T::from_f64(term).to_f64();
                if rounded.is_infinite() || rounded < F32_MIN_NORMAL {
                    term = rounded;
                }
            }
            lanes[i % VIRTUAL_LANES] += term;
        }
        return lanes.iter().fold(0.0, |acc, &x| acc + x);
    }
    let mut body = BlockReduce {
        reduction,
        a,
        b: b.unwrap_or(a),
        out: 0.0,
    };
    T::dispatch(backend, &mut body);
    body.out
}

struct BlockReduce<'a, T> {
    reduction: Reduction,
    a: &'a [T],
    b: &'a [T],
    out: f64,
}

impl<T: Element> WithLanes<T> for BlockReduce<'_, T> {
    #[inline(always)]
    fn run<S: Lanes<T>>(&mut self, simd: S) {
        let (a, b) = (self.a.as_ptr(), self.b.as_ptr());
        let n = self.a.len();
        // SAFETY: `a` and `b` both hold `n` elements.
        self.out = unsafe {
            match self.reduction {
                Reduction::SumAbs => fold_block(simd, n, SumAbs, a, b),
                Reduction::SumSquares => fold_block(simd, n, SumSquares, a, b),
                Reduction::MaxAbs => fold_block(simd, n, MaxAbs, a, b),
                Reduction::AnyNonfinite => fold_block(simd, n, Nonfinite, a, b),
                Reduction::DirectionSquares {
                    l1,
                    weight_decay,
                    maximize,
                } => fold_block(
                    simd,
                    n,
                    DirectionSquares {
                        l1: (l1 != 0.0).then(|| T::from_f64(l1)),
                        weight_decay: (weight_decay != 0.0).then(|| T::from_f64(weight_decay)),
                        maximize,
                    },
                    a,
                    b,
                ),
                Reduction::SumPow(_) | Reduction::SumPowTorch(_) => {
                    unreachable!("handled without vectors")
                }
            }
        };
    }
}

/// One reduction's per-element fold, written once for every [`Lanes`].
trait Fold<T: Element>: Copy {
    const MAX: bool = false;
    /// Folds elements `i..i + S::WIDTH` of `a` (and `b`) into `acc`.
    ///
    /// # Safety
    /// `i + S::WIDTH` must be within both arrays.
    unsafe fn fold<S: Lanes<T>>(self, s: S, acc: S::V, a: *const T, b: *const T, i: usize) -> S::V;
}

#[derive(Clone, Copy)]
struct SumAbs;
impl<T: Element> Fold<T> for SumAbs {
    #[inline(always)]
    unsafe fn fold<S: Lanes<T>>(self, s: S, acc: S::V, a: *const T, _: *const T, i: usize) -> S::V {
        // SAFETY: the caller of `fold` guarantees i + WIDTH is within the arrays.
        s.add(acc, s.abs(unsafe { s.load(a.add(i)) }))
    }
}

#[derive(Clone, Copy)]
struct SumSquares;
impl<T: Element> Fold<T> for SumSquares {
    #[inline(always)]
    unsafe fn fold<S: Lanes<T>>(self, s: S, acc: S::V, a: *const T, _: *const T, i: usize) -> S::V {
        // SAFETY: the caller of `fold` guarantees i + WIDTH is within the arrays.
        s.square_acc(acc, unsafe { s.load(a.add(i)) })
    }
}

#[derive(Clone, Copy)]
struct MaxAbs;
impl<T: Element> Fold<T> for MaxAbs {
    const MAX: bool = true;
    #[inline(always)]
    unsafe fn fold<S: Lanes<T>>(self, s: S, acc: S::V, a: *const T, _: *const T, i: usize) -> S::V {
        // SAFETY: the caller of `fold` guarantees i + WIDTH is within the arrays.
        s.max(s.abs(unsafe { s.load(a.add(i)) }), acc)
    }
}

/// Adds `x − x`: zero for finite `x`, NaN for NaN and ±inf, so the sum is NaN iff one was.
#[derive(Clone, Copy)]
struct Nonfinite;
impl<T: Element> Fold<T> for Nonfinite {
    #[inline(always)]
    unsafe fn fold<S: Lanes<T>>(self, s: S, acc: S::V, a: *const T, _: *const T, i: usize) -> S::V {
        // SAFETY: the caller of `fold` guarantees i + WIDTH is within the arrays.
        let x = unsafe { s.load(a.add(i)) };
        s.add(acc, s.sub(x, x))
    }
}

#[derive(Clone, Copy)]
struct DirectionSquares<T> {
    l1: Option<T>,
    weight_decay: Option<T>,
    maximize: bool,
}
impl<T: Element> Fold<T> for DirectionSquares<T> {
    #[inline(always)]
    unsafe fn fold<S: Lanes<T>>(self, s: S, acc: S::V, a: *const T, b: *const T, i: usize) -> S::V {
        // SAFETY: the caller of `fold` guarantees i + WIDTH is within the arrays.
        let (p, g) = unsafe { (s.load(a.add(i)), s.load(b.add(i))) };
        let d = direction(s, p, g, self.maximize, self.weight_decay, self.l1);
        s.square_acc(acc, d)
    }
}

/// Folds `n` elements into [`VIRTUAL_LANES`] accumulators (element `i` into
/// lane `i % 16`), then combines the lanes in order in f64.
///
/// # Safety
/// `a` and `b` must be valid for reading `n` elements.
#[inline(always)]
unsafe fn fold_block<T: Element, S: Lanes<T>, F: Fold<T>>(
    s: S,
    n: usize,
    f: F,
    a: *const T,
    b: *const T,
) -> f64 {
    debug_assert!(VIRTUAL_LANES.is_multiple_of(S::WIDTH));
    let per_group = VIRTUAL_LANES / S::WIDTH;
    let mut acc = [s.splat(T::ZERO); VIRTUAL_LANES];
    let full = n - n % VIRTUAL_LANES;
    let mut i = 0;
    while i < full {
        for (j, v) in acc.iter_mut().take(per_group).enumerate() {
            // SAFETY: i + VIRTUAL_LANES <= full <= n.
            *v = unsafe { f.fold(s, *v, a, b, i + j * S::WIDTH) };
        }
        i += VIRTUAL_LANES;
    }
    let mut lanes = [T::ZERO; VIRTUAL_LANES];
    for (j, v) in acc.iter().take(per_group).enumerate() {
        // SAFETY: `lanes` holds VIRTUAL_LANES = per_group * WIDTH elements.
        unsafe { s.store(lanes.as_mut_ptr().add(j * S::WIDTH), *v) };
    }
    while i < n {
        let k = i % VIRTUAL_LANES;
        // SAFETY: i < n; Scalar reads one element.
        lanes[k] = unsafe { f.fold(Scalar, lanes[k], a, b, i) };
        i += 1;
    }
    let mut out = lanes[0].to_f64();
    for x in &lanes[1..] {
        let x = x.to_f64();
        out = if F::MAX {
            if x > out || x.is_nan() {
                x
            } else {
                out
            }
        } else {
            out + x
        };
    }
    out
}
