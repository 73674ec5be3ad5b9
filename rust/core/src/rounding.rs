//! How an updated parameter is stored back into a bfloat16 tensor: rounded
//! to nearest (torch's choice), stochastically (unbiased, torchao's
//! `bf16_stochastic_round`), or with Kahan compensation (torch-optimi's
//! `kahan_sum`, the compensation kept in a bfloat16 state array).
//!
//! Stochastic rounding adds 16 random bits to the f32 bit pattern and
//! truncates: `|x|` rounds up with probability equal to its distance from the
//! lower neighbour, so the expected result is `x` and the result is always
//! one of the two bfloat16 numbers around it. The bits come from a
//! counter-based hash of (seed, call count, tensor slot, element index), so
//! they do not depend on the thread count or the work split.

use crate::dispatch::{Backend, WithLanes};
use crate::simd::{Lanes, Scalar};
use half::bf16;

/// How array 0 (the parameter) of a bfloat16 slot is narrowed after the f32 update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ParamRounding {
    /// Round to nearest even (torch's cast).
    #[default]
    Nearest,
    /// Unbiased stochastic rounding with the random stream of `(seed, count)`;
    /// `count` is the caller's step count, so each step draws fresh bits.
    Stochastic { seed: u64, count: u64 },
    /// Kahan-compensated: the last array of each slot is a bfloat16
    /// compensation buffer holding what the stored parameter misses.
    Kahan,
}

impl ParamRounding {
    pub fn name(self) -> &'static str {
        match self {
            ParamRounding::Nearest => "round-to-nearest",
            ParamRounding::Stochastic { .. } => "stochastic rounding",
            ParamRounding::Kahan => "Kahan summation",
        }
    }
}

/// splitmix64's finaliser: a bijective 64-bit mix.
#[inline]
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The two 32-bit keys of one slot's elements `hi << 32 ..`, from the call's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    pub k1: u32,
    pub k2: u32,
}

impl StreamKey {
    pub fn new(seed: u64, count: u64, slot: usize, index_hi: u32) -> StreamKey {
        let k = splitmix64(
            splitmix64(splitmix64(seed) ^ count) ^ ((slot as u64) << 32 | index_hi as u64),
        );
        StreamKey {
            k1: k as u32,
            k2: (k >> 32) as u32,
        }
    }
}

/// Chris Wellons' `lowbias32` integer hash (a bijection on u32).
#[inline(always)]
pub fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The random bits of element `index_lo` (its low 32 bits) under `key`.
#[inline(always)]
pub fn element_bits(index_lo: u32, key: StreamKey) -> u32 {
    lowbias32(lowbias32(index_lo ^ key.k1).wrapping_add(key.k2))
}

/// Quiet NaN, as torch writes a NaN to bfloat16.
pub const BF16_NAN_BITS: u16 = 0x7fc0;

/// `x` rounded to bfloat16 by adding the low 16 of `bits` below its kept
/// mantissa and truncating (NaN stays a quiet NaN, ±inf stays ±inf).
#[inline(always)]
pub fn stochastic_bf16(x: f32, bits: u32) -> u16 {
    if x.is_nan() {
        return BF16_NAN_BITS;
    }
    (x.to_bits().wrapping_add(bits & 0xffff) >> 16) as u16
}

/// `x` rounded to the nearest bfloat16 (ties to even), returned as the f32
/// that bfloat16 widens to; what `half::bf16::from_f32` gives, for Kahan's
/// in-register rounding.
#[inline(always)]
pub fn nearest_bf16_f32(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Writes `src` (f32) into `dst` (bfloat16) with stochastic rounding, element
/// `j` of `src` being element `start + j` of slot `slot` (which keys its bits).
pub fn narrow_stochastic(
    backend: Backend,
    src: &[f32],
    dst: &mut [bf16],
    start: usize,
    stream: (u64, u64),
    slot: usize,
) {
    struct Run<'a> {
        src: &'a [f32],
        dst: &'a mut [bf16],
        start: usize,
        stream: (u64, u64),
        slot: usize,
    }
    impl WithLanes<f32> for Run<'_> {
        #[inline(always)]
        fn run<S: Lanes<f32>>(&mut self, s: S) {
            narrow_stochastic_lanes(s, self.src, self.dst, self.start, self.stream, self.slot)
        }
    }
    let mut run = Run {
        src,
        dst,
        start,
        stream,
        slot,
    };
    <f32 as crate::dispatch::Element>::dispatch(backend, &mut run);
}

/// [`narrow_stochastic`] on the vectors of `s` (for callers already inside a SIMD path).
#[inline(always)]
pub fn narrow_stochastic_lanes<S: Lanes<f32>>(
    s: S,
    src: &[f32],
    dst: &mut [bf16],
    start: usize,
    (seed, count): (u64, u64),
    slot: usize,
) {
    assert_eq!(src.len(), dst.len(), "narrowing arrays differ in length");
    let out = dst.as_mut_ptr() as *mut u16;
    // Split where the high 32 bits of the index change (each piece has one key).
    let mut at = 0;
    while at < src.len() {
        let index = start + at;
        let hi = (index as u64 >> 32) as u32;
        let room = ((hi as u64 + 1) << 32) - index as u64;
        let n = (src.len() - at).min(room.min(usize::MAX as u64) as usize);
        let key = StreamKey::new(seed, count, slot, hi);
        let first = index as u32;
        let full = n - n % S::WIDTH;
        let mut i = 0;
        // SAFETY: at + i + WIDTH <= at + n <= len in the vector loop and
        // at + i < len in the tail; bf16 is a transparent u16.
        unsafe {
            while i < full {
                let x = s.load(src.as_ptr().add(at + i));
                s.narrow_bf16_stochastic(x, first.wrapping_add(i as u32), key, out.add(at + i));
                i += S::WIDTH;
            }
            while i < n {
                let x = *src.get_unchecked(at + i);
                Scalar.narrow_bf16_stochastic(
                    x,
                    first.wrapping_add(i as u32),
                    key,
                    out.add(at + i),
                );
                i += 1;
            }
        }
        at += n;
    }
}

/// `src` widened to f32 into `dst` (exact), on the vectors of `backend`.
pub fn widen_bf16(backend: Backend, src: &[bf16], dst: &mut [f32]) {
    struct Run<'a>(&'a [bf16], &'a mut [f32]);
    impl WithLanes<f32> for Run<'_> {
        #[inline(always)]
        fn run<S: Lanes<f32>>(&mut self, s: S) {
            widen_bf16_lanes(s, self.0, self.1)
        }
    }
    <f32 as crate::dispatch::Element>::dispatch(backend, &mut Run(src, dst));
}

/// `src` rounded to nearest bfloat16 into `dst` (as `half::bf16::from_f32`),
/// on the vectors of `backend`.
pub fn narrow_bf16(backend: Backend, src: &[f32], dst: &mut [bf16]) {
    struct Run<'a>(&'a [f32], &'a mut [bf16]);
    impl WithLanes<f32> for Run<'_> {
        #[inline(always)]
        fn run<S: Lanes<f32>>(&mut self, s: S) {
            narrow_bf16_lanes(s, self.0, self.1)
        }
    }
    <f32 as crate::dispatch::Element>::dispatch(backend, &mut Run(src, dst));
}

/// [`widen_bf16`] on the vectors of `s`.
#[inline(always)]
pub fn widen_bf16_lanes<S: Lanes<f32>>(s: S, src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widening arrays differ in length");
    let (n, from, to) = (src.len(), src.as_ptr() as *const u16, dst.as_mut_ptr());
    let full = n - n % S::WIDTH;
    let mut i = 0;
    // SAFETY: i + WIDTH <= n in the vector loop, i < n in the tail; bf16 is a transparent u16.
    unsafe {
        while i < full {
            s.store(to.add(i), s.widen_bf16(from.add(i)));
            i += S::WIDTH;
        }
        while i < n {
            *to.add(i) = Scalar.widen_bf16(from.add(i));
            i += 1;
        }
    }
}

/// [`narrow_bf16`] on the vectors of `s`.
#[inline(always)]
pub fn narrow_bf16_lanes<S: Lanes<f32>>(s: S, src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "narrowing arrays differ in length");
    let (n, from, to) = (src.len(), src.as_ptr(), dst.as_mut_ptr() as *mut u16);
    let full = n - n % S::WIDTH;
    let mut i = 0;
    // SAFETY: as in `widen_bf16_lanes`.
    unsafe {
        while i < full {
            s.narrow_bf16_nearest(s.load(from.add(i)), to.add(i));
            i += S::WIDTH;
        }
        while i < n {
            Scalar.narrow_bf16_nearest(*from.add(i), to.add(i));
            i += 1;
        }
    }
}

/// One Kahan-compensated store of an updated parameter: `old` is the stored
/// bfloat16 parameter (as f32), `new` the f32 update of it, `comp` the
/// compensation (as f32). Returns `(parameter, compensation)` as bfloat16.
///
/// As torch-optimi: the update joins the compensation, the parameter takes
/// what of it bfloat16 can hold, the compensation keeps the rest.
#[inline(always)]
pub fn kahan_bf16(old: f32, new: f32, comp: f32) -> (bf16, bf16) {
    let total = comp + (new - old);
    let stored = nearest_bf16_f32(old + total);
    (
        bf16::from_f32(stored),
        bf16::from_f32(total - (stored - old)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_rounding_stays_between_neighbours_and_keeps_specials() {
        let x = 1.0f32 + 3.0 * f32::EPSILON; // between 1 and the next bfloat16
        let lo = bf16::from_f32(1.0).to_bits();
        for bits in [0, 1, 0x7fff, 0xffff, 0x1_0000, u32::MAX] {
            let r = stochastic_bf16(x, bits);
            assert!(r == lo || r == lo + 1, "{r:#x}");
            assert_eq!(stochastic_bf16(-x, bits), r | 0x8000);
            assert_eq!(stochastic_bf16(2.5, bits), bf16::from_f32(2.5).to_bits());
            assert_eq!(stochastic_bf16(f32::INFINITY, bits), 0x7f80);
            assert_eq!(stochastic_bf16(f32::NEG_INFINITY, bits), 0xff80);
            assert_eq!(stochastic_bf16(f32::NAN, bits), BF16_NAN_BITS);
            assert_eq!(stochastic_bf16(-0.0, bits), 0x8000);
        }
    }

    #[test]
    fn kahan_keeps_what_the_parameter_cannot_hold() {
        // 1 + 1e-4 is not a bfloat16: the parameter stays 1, the compensation keeps 1e-4.
        let (p, c) = kahan_bf16(1.0, 1.0 + 1e-4, 0.0);
        assert_eq!(p.to_f32(), 1.0);
        assert!((c.to_f32() - 1e-4).abs() < 1e-6);
        // Enough small updates move the parameter by their sum.
        let (mut p, mut c) = (bf16::from_f32(1.0), bf16::from_f32(0.0));
        for _ in 0..1000 {
            (p, c) = kahan_bf16(p.to_f32(), p.to_f32() + 1e-4, c.to_f32());
        }
        // (the bfloat16 compensation rounds each step: a few ulps of it over 1000 steps)
        assert!((p.to_f32() + c.to_f32() - 1.1).abs() < 5e-3, "{p} {c}");
    }
}
