//! The arrays a lane kernel reads and writes in place, vector by vector:
//! plain `*mut T` memory, or float32/bfloat16 memory ([`Mem`]) whose
//! bfloat16 arrays are widened on load and rounded on store, the parameter
//! ([`ParamMem`]) with the call's [`ParamRounding`]. A kernel written over
//! [`LaneArray`]/[`ParamArray`] thus runs on bfloat16 weights or state in one
//! pass, with no f32 staging copies; per lane it performs exactly the
//! operations of widening, the f32 update and narrowing done one after the
//! other, so the result is the same bits. [`typed`] turns the run-time
//! description into one of a few monomorphic array types, so the hot loop
//! does not branch on dtypes at every load and store.

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
    Stochastic(StochasticParam),
    /// bfloat16 with Kahan compensation in `comp` (as [`crate::rounding::kahan_bf16`]).
    Kahan(KahanParam),
}

impl ParamMem {
    /// The parameter `param` of a work item starting at slot element `start`
    /// of a slot whose random stream is `stream` ([`crate::TensorBatch::stream`]),
    /// stored with `rounding` (Kahan needs `comp`; without it, and for float32,
    /// the rounding is to nearest, as the staged path does).
    /// Elements of the item must share the high 32 bits of their index.
    pub fn new(
        param: Mem,
        rounding: ParamRounding,
        comp: Option<*mut u16>,
        stream: usize,
        start: usize,
    ) -> ParamMem {
        match (param, rounding, comp) {
            (Mem::BF16(param), ParamRounding::Stochastic { seed, count }, _) => {
                ParamMem::Stochastic(StochasticParam {
                    param,
                    first: start as u32,
                    key: StreamKey::new(seed, count, stream, (start as u64 >> 32) as u32),
                })
            }
            (Mem::BF16(param), ParamRounding::Kahan, Some(comp)) => {
                ParamMem::Kahan(KahanParam { param, comp })
            }
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
                ParamMem::Stochastic(p) => p.load(s, i),
                ParamMem::Kahan(p) => p.load(s, i),
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
                ParamMem::Stochastic(p) => p.store_param(s, i, v),
                ParamMem::Kahan(p) => p.store_param(s, i, v),
            }
        }
    }
}

/// A bfloat16 array: widened on load, rounded to nearest on store.
#[derive(Clone, Copy, Debug)]
pub struct Bf16(pub *mut u16);

impl LaneArray<f32> for Bf16 {
    #[inline(always)]
    unsafe fn load<S: Lanes<f32>>(self, s: S, i: usize) -> S::V {
        // SAFETY: forwarded to the caller.
        unsafe { s.widen_bf16(self.0.add(i)) }
    }
    #[inline(always)]
    unsafe fn store<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe { s.narrow_bf16_nearest(v, self.0.add(i)) }
    }
}

impl ParamArray<f32> for Bf16 {
    #[inline(always)]
    unsafe fn store_param<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store(s, i, v) }
    }
}

/// A bfloat16 parameter stored with stochastic rounding (see [`ParamMem::Stochastic`]).
#[derive(Clone, Copy, Debug)]
pub struct StochasticParam {
    param: *mut u16,
    first: u32,
    key: StreamKey,
}

/// A bfloat16 parameter stored with Kahan compensation (see [`ParamMem::Kahan`]).
#[derive(Clone, Copy, Debug)]
pub struct KahanParam {
    param: *mut u16,
    comp: *mut u16,
}

/// Loads of a bfloat16 parameter; its stores go through its rounding.
macro_rules! bf16_param_loads {
    ($($t:ty),+) => {$(
        impl LaneArray<f32> for $t {
            #[inline(always)]
            unsafe fn load<S: Lanes<f32>>(self, s: S, i: usize) -> S::V {
                // SAFETY: forwarded to the caller.
                unsafe { Bf16(self.param).load(s, i) }
            }
            #[inline(always)]
            unsafe fn store<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
                // SAFETY: forwarded to the caller.
                unsafe { self.store_param(s, i, v) }
            }
        }
    )+};
}
bf16_param_loads!(StochasticParam, KahanParam);

impl ParamArray<f32> for StochasticParam {
    #[inline(always)]
    unsafe fn store_param<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        let index = self.first.wrapping_add(i as u32);
        // SAFETY: forwarded to the caller.
        unsafe { s.narrow_bf16_stochastic(v, index, self.key, self.param.add(i)) }
    }
}

impl ParamArray<f32> for KahanParam {
    #[inline(always)]
    unsafe fn store_param<S: Lanes<f32>>(self, s: S, i: usize, v: S::V) {
        let (param, comp) = (self.param, self.comp);
        // As `kahan_bf16`: the update joins the compensation, the parameter
        // takes what bfloat16 holds of it, the compensation keeps the rest.
        // SAFETY: forwarded to the caller.
        unsafe {
            let old = s.widen_bf16(param.add(i));
            let total = s.add(s.widen_bf16(comp.add(i)), s.sub(v, old));
            let stored = s.round_bf16(s.add(old, total));
            s.narrow_bf16_nearest(stored, param.add(i));
            s.narrow_bf16_nearest(s.sub(total, s.sub(stored, old)), comp.add(i));
        }
    }
}

/// A body run on the arrays of a fused update, as whichever types [`typed`] picks.
pub trait FusedBody {
    /// `state` holds the state arrays in order, padded with unused ones.
    fn run<P: ParamArray<f32>, G: LaneArray<f32>, A: LaneArray<f32>>(
        &mut self,
        param: P,
        grad: G,
        state: [A; MAX_STATE],
    );
}

/// State arrays a [`FusedBody`] gets (arrays after the parameter and gradient).
pub const MAX_STATE: usize = crate::tensors::MAX_ARITY - 2;

/// Runs `body` on `param`, `grad` and `state` as monomorphic types when their
/// dtypes are one of the common layouts (bfloat16 weights with bfloat16 or
/// float32 state; float32 weights with bfloat16 state), else as [`Mem`]s.
#[inline(always)]
pub fn typed<B: FusedBody>(param: ParamMem, grad: Mem, state: &[Mem], body: &mut B) {
    assert!(state.len() <= MAX_STATE, "too many state arrays");
    let unused = Mem::F32(std::ptr::null_mut());
    let bf16_state = state.iter().all(|m| matches!(m, Mem::BF16(_)));
    let f32_state = state.iter().all(|m| matches!(m, Mem::F32(_)));
    let pick = |k: usize| state.get(k).copied().unwrap_or(unused);
    let as_bf16 = || {
        std::array::from_fn(|k| {
            Bf16(match pick(k) {
                Mem::BF16(p) => p,
                Mem::F32(_) => std::ptr::null_mut(),
            })
        })
    };
    let as_f32 = || {
        std::array::from_fn(|k| match pick(k) {
            Mem::F32(p) => p,
            Mem::BF16(_) => std::ptr::null_mut(),
        })
    };
    match (param, grad) {
        (ParamMem::Plain(Mem::F32(p)), Mem::F32(g)) if bf16_state => body.run(p, g, as_bf16()),
        (ParamMem::Plain(Mem::BF16(p)), Mem::BF16(g)) if bf16_state => {
            body.run(Bf16(p), Bf16(g), as_bf16())
        }
        (ParamMem::Plain(Mem::BF16(p)), Mem::BF16(g)) if f32_state => {
            body.run(Bf16(p), Bf16(g), as_f32())
        }
        (ParamMem::Stochastic(p), Mem::BF16(g)) if bf16_state => body.run(p, Bf16(g), as_bf16()),
        (ParamMem::Stochastic(p), Mem::BF16(g)) if f32_state => body.run(p, Bf16(g), as_f32()),
        (ParamMem::Kahan(p), Mem::BF16(g)) if bf16_state => body.run(p, Bf16(g), as_bf16()),
        _ => body.run(param, grad, std::array::from_fn(pick)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Backend, Element, WithLanes};

    /// `param = param * 0.75 + grad + state[0]`, `state[0] = grad - state[0]`
    /// over `n` elements, on the vectors of `backend`.
    struct Body {
        backend: Backend,
        n: usize,
    }

    impl FusedBody for Body {
        fn run<P: ParamArray<f32>, G: LaneArray<f32>, A: LaneArray<f32>>(
            &mut self,
            param: P,
            grad: G,
            state: [A; MAX_STATE],
        ) {
            struct Run<P, G, A>(P, G, A, usize);
            impl<P: ParamArray<f32>, G: LaneArray<f32>, A: LaneArray<f32>> WithLanes<f32> for Run<P, G, A> {
                fn run<S: Lanes<f32>>(&mut self, s: S) {
                    let Run(p, g, a, n) = *self;
                    let mut i = 0;
                    // SAFETY: every array holds `n` elements; the tail runs one lane at a time.
                    unsafe {
                        while i < n {
                            if i + S::WIDTH <= n {
                                let (x, y, z) = (p.load(s, i), g.load(s, i), a.load(s, i));
                                p.store_param(s, i, s.add(s.mul_add(x, s.splat(0.75), y), z));
                                a.store(s, i, s.sub(y, z));
                                i += S::WIDTH;
                            } else {
                                let sc = crate::simd::Scalar;
                                let (x, y, z) = (p.load(sc, i), g.load(sc, i), a.load(sc, i));
                                p.store_param(sc, i, x.mul_add(0.75, y) + z);
                                a.store(sc, i, y - z);
                                i += 1;
                            }
                        }
                    }
                }
            }
            f32::dispatch(self.backend, &mut Run(param, grad, state[0], self.n));
        }
    }

    /// Each layout through `typed` (its monomorphic types) and straight as
    /// `Mem`s (the fallback) gives the same bits, every backend and tail.
    #[test]
    fn typed_arrays_match_the_generic_fallback() {
        let roundings = [
            ParamRounding::Nearest,
            ParamRounding::Stochastic { seed: 3, count: 9 },
            ParamRounding::Kahan,
        ];
        for backend in Backend::supported() {
            for n in 0..=67usize {
                for rounding in roundings {
                    for (wide_param, wide_state) in [(false, false), (false, true), (true, false)] {
                        let run = |fallback: bool| {
                            let x = |k: usize| {
                                (0..n).map(move |i| {
                                    ((i * 37 + k * 11) % 29) as f32 * 0.173 - 2.0 + 1e-3 * i as f32
                                })
                            };
                            let mut p32: Vec<f32> = x(0).collect();
                            let mut g32: Vec<f32> = x(1).collect();
                            let mut a32: Vec<f32> = x(2).collect();
                            let to16 = |v: &Vec<f32>| {
                                v.iter()
                                    .map(|&y| half::bf16::from_f32(y).to_bits())
                                    .collect::<Vec<u16>>()
                            };
                            let (mut p16, mut g16, mut a16, mut c16) =
                                (to16(&p32), to16(&g32), to16(&a32), to16(&g32));
                            let (param, grad) = if wide_param {
                                (Mem::F32(p32.as_mut_ptr()), Mem::F32(g32.as_mut_ptr()))
                            } else {
                                (Mem::BF16(p16.as_mut_ptr()), Mem::BF16(g16.as_mut_ptr()))
                            };
                            let state = if wide_state {
                                Mem::F32(a32.as_mut_ptr())
                            } else {
                                Mem::BF16(a16.as_mut_ptr())
                            };
                            let param =
                                ParamMem::new(param, rounding, Some(c16.as_mut_ptr()), 2, 1 << 20);
                            let mut body = Body { backend, n };
                            if fallback {
                                let unused = Mem::F32(std::ptr::null_mut());
                                body.run(
                                    param,
                                    grad,
                                    std::array::from_fn(|k| if k == 0 { state } else { unused }),
                                );
                            } else {
                                typed(param, grad, &[state], &mut body);
                            }
                            let bits32 =
                                |v: &Vec<f32>| v.iter().map(|y| y.to_bits()).collect::<Vec<u32>>();
                            (bits32(&p32), bits32(&a32), p16, a16, c16)
                        };
                        assert_eq!(
                            run(false),
                            run(true),
                            "{backend:?} n={n} {rounding:?} {wide_param} {wide_state}"
                        );
                    }
                }
            }
        }
    }
}
