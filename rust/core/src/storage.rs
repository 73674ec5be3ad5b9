//! The arrays a lane kernel reads and writes in place, vector by vector:
//! plain `*mut T` memory, or float32/bfloat16 memory ([`Mem`]) whose
//! bfloat16 arrays are widened on load and rounded on store, the parameter
//! ([`ParamMem`]) with the call's [`ParamRounding`]. A kernel written over
//! [`LaneArray`]/[`ParamArray`] thus runs on bfloat16 weights or state in one
//! pass, with no f32 staging copies; per lane it performs exactly the
//! operations of widening, the f32 update and narrowing done one after the
//! other, so the result is the same bits.

use crate::rounding::{ParamRounding, StreamKey};
use crate::simd::{Lanes, Real};

/// An array a lane kernel loads and stores at element offsets.
pub trait LaneArray<T: Real>: Copy {
    /// # Safety
    /// Elements `i..i + S::WIDTH` must be readable.
    unsafe fn load<S: Lanes<T>>(self, s: S, i: usize) -> S::V;
    /// # Safety
    /// Elements `i..i + S::WIDTH` must be writable.
    unsafe fn store<S: Lanes<T>>(self, s: S, i: usize, v: S::V);
}

impl<T: Real> LaneArray<T> for *mut T {
    #[inline(always)]
    unsafe fn load<S: Lanes<T>>(self, s: S, i: usize) -> S::V {
        // SAFETY: forwarded to the caller.
        unsafe { s.load(self.add(i)) }
    }
    #[inline(always)]
    unsafe fn store<S: Lanes<T>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe { s.store(self.add(i), v) }
    }
}

/// The parameter array: loaded like any array, stored with its rounding.
pub trait ParamArray<T: Real>: LaneArray<T> {
    /// Stores the updated parameter `v` at `i` (the old value still in memory).
    ///
    /// # Safety
    /// Elements `i..i + S::WIDTH` (of the compensation too) must be writable.
    unsafe fn store_param<S: Lanes<T>>(self, s: S, i: usize, v: S::V);
}

impl<T: Real> ParamArray<T> for *mut T {
    #[inline(always)]
    unsafe fn store_param<S: Lanes<T>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store(s, i, v) }
    }
}

/// A float32 or bfloat16 array of a fused update (bfloat16 stored rounded to nearest).
#[derive(Clone, Copy, Debug)]
pub enum Mem {
    F32(*mut f32),
    BF16(*mut u16),
}

impl Mem {
    /// The same array from element `k` on (no access is made).
    pub fn offset(self, k: usize) -> Mem {
        match self {
            Mem::F32(p) => Mem::F32(p.wrapping_add(k)),
            Mem::BF16(p) => Mem::BF16(p.wrapping_add(k)),
        }
    }
}

impl LaneArray<f32> for Mem {
    #[inline(always)]
    unsafe fn load<S: Lanes<f32>>(self, s: S, i: usize) -> S::V {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self {
                Mem::F32(p) => s.load(p.add(i)),
                Mem::BF16(p) => s.widen_bf16(p.add(i)),
            }
        }
    }
    #[inline(always)]
    unsafe fn store<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self {
                Mem::F32(p) => s.store(p.add(i), v),
                Mem::BF16(p) => s.narrow_bf16_nearest(v, p.add(i)),
            }
        }
    }
}

/// The parameter of a fused update and how it is stored back.
#[derive(Clone, Copy, Debug)]
pub enum ParamMem {
    /// float32 (or bfloat16 rounded to nearest).
    Plain(Mem),
    /// bfloat16 with stochastic rounding: element `i` takes the random bits
    /// of index `first + i` under `key` (the caller keeps `first + i` from
    /// wrapping, so the key's high index bits hold for every element).
    Stochastic {
        param: *mut u16,
        first: u32,
        key: StreamKey,
    },
    /// bfloat16 with Kahan compensation in `comp` (as [`crate::rounding::kahan_bf16`]).
    Kahan { param: *mut u16, comp: *mut u16 },
}

impl ParamMem {
    /// The parameter `param` of a work item starting at slot element `start`
    /// of slot `slot`, stored with `rounding` (Kahan needs `comp`; without it,
    /// and for float32, the rounding is to nearest, as the staged path does).
    /// Elements of the item must share the high 32 bits of their index.
    pub fn new(
        param: Mem,
        rounding: ParamRounding,
        comp: Option<*mut u16>,
        slot: usize,
        start: usize,
    ) -> ParamMem {
        match (param, rounding, comp) {
            (Mem::BF16(param), ParamRounding::Stochastic { seed, count }, _) => {
                ParamMem::Stochastic {
                    param,
                    first: start as u32,
                    key: StreamKey::new(seed, count, slot, (start as u64 >> 32) as u32),
                }
            }
            (Mem::BF16(param), ParamRounding::Kahan, Some(comp)) => ParamMem::Kahan { param, comp },
            (param, _, _) => ParamMem::Plain(param),
        }
    }
}

impl LaneArray<f32> for ParamMem {
    #[inline(always)]
    unsafe fn load<S: Lanes<f32>>(self, s: S, i: usize) -> S::V {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self {
                ParamMem::Plain(m) => m.load(s, i),
                ParamMem::Stochastic { param, .. } | ParamMem::Kahan { param, .. } => {
                    s.widen_bf16(param.add(i))
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn store<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store_param(s, i, v) }
    }
}

impl ParamArray<f32> for ParamMem {
    #[inline(always)]
    unsafe fn store_param<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self {
                ParamMem::Plain(m) => m.store(s, i, v),
                ParamMem::Stochastic { param, first, key } => {
                    s.narrow_bf16_stochastic(v, first.wrapping_add(i as u32), key, param.add(i))
                }
                ParamMem::Kahan { param, comp } => {
                    // As `kahan_bf16`: the update joins the compensation, the
                    // parameter takes what bfloat16 holds of it, comp the rest.
                    let old = s.widen_bf16(param.add(i));
                    let total = s.add(s.widen_bf16(comp.add(i)), s.sub(v, old));
                    let stored = s.round_bf16(s.add(old, total));
                    s.narrow_bf16_nearest(stored, param.add(i));
                    s.narrow_bf16_nearest(s.sub(total, s.sub(stored, old)), comp.add(i));
                }
            }
        }
    }
}
