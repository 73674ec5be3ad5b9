//! `sqrt(x) / d` for a per-step constant `d`, bit for bit the division torch
//! performs, without the divider (Adam's `exp_avg_sq.sqrt() / bias_correction2_sqrt`).
//!
//! A vector division is the slowest instruction of Adam's update, and Adam
//! has two; this one divides by a constant. With `y = 1/d` correctly rounded,
//! `q = sqrt(x)·y`, its remainder `r = sqrt(x) − q·d` in one FMA, and
//! `q + r·y` in another. Markstein's theorem proves that correctly rounded
//! only where `q` is within an ulp of the quotient, and `RN(a·RN(1/d))` is
//! not always (up to ~1.5 ulp; then `r` can round too): the identity with
//! the division rests on the tests (every f32 input for a few divisors,
//! f64 sampled), not on the theorem. It needs nothing to overflow or
//! underflow. Square roots keep both away: the smallest nonzero one is about
//! 2^-75 (f32; 2^-537 for f64), so `r` stays a normal number, and `d` lies in `(0, 1]`, so the
//! quotient is no smaller than the root and, with `d ≥ 2^-27` (what any β2 < 1
//! gives), no larger than finite. Where `r` is zero or NaN (exact quotients,
//! ±0, infinity, NaN) `q` is already the answer. Any other `d` divides.
//! `tests` checks every f32 input against the division for a few divisors,
//! every quotient significand for 24 divisors of the one kind where a
//! rounded `r` could push the result across a midpoint (significand near 2,
//! reciprocal rounded by nearly half an ulp), and f64 at random and next to
//! rounding midpoints (the hardest quotients).

use crate::dispatch::Element;
use crate::simd::Lanes;

/// `sqrt(x) / divisor` for one divisor (see the module note).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SqrtOver<T> {
    divisor: T,
    /// `1 / divisor`, correctly rounded; `None`: divide.
    reciprocal: Option<T>,
}

impl<T: Element> SqrtOver<T> {
    pub(crate) fn new(divisor: T) -> SqrtOver<T> {
        let in_range = divisor >= T::from_f64(2f64.powi(-27)) && divisor <= T::ONE;
        SqrtOver {
            divisor,
            reciprocal: in_range.then(|| T::ONE / divisor),
        }
    }

    #[inline(always)]
    pub(crate) fn apply<S: Lanes<T>>(&self, s: S, x: S::V) -> S::V {
        self.over(s, s.sqrt(x))
    }

    /// `root / divisor` (see the module note).
    #[inline(always)]
    fn over<S: Lanes<T>>(&self, s: S, root: S::V) -> S::V {
        let Some(y) = self.reciprocal else {
            return s.div(root, s.splat(self.divisor));
        };
        let q = s.mul(root, s.splat(y));
        let r = s.mul_add(q, s.splat(-self.divisor), root);
        let corrected = s.mul_add(r, s.splat(y), q);
        // `corrected` where 0 < |r|; `q` where r is ±0 or NaN.
        s.lt_select(s.splat(T::ZERO), s.abs(r), corrected, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{run_block, Backend};
    use crate::simd::LaneBlock;

    /// Writes `op` (or, without one, `sqrt(x) / divisor` by division) of
    /// `src` into `dst`; of `x` itself, not its root, where `no_root`.
    struct Apply<'a, T> {
        op: Option<SqrtOver<T>>,
        no_root: bool,
        divisor: T,
        src: &'a [T],
        dst: &'a mut [T],
    }

    impl<T: Element> LaneBlock<T> for Apply<'_, T> {
        #[inline(always)]
        unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
            // SAFETY: `run_block` keeps i + WIDTH within both slices.
            unsafe {
                let x = s.load(self.src.as_ptr().add(i));
                let v = match self.op {
                    Some(op) if self.no_root => op.over(s, x),
                    None if self.no_root => s.div(x, s.splat(self.divisor)),
                    Some(op) => op.apply(s, x),
                    None => s.div(s.sqrt(x), s.splat(self.divisor)),
                };
                s.store(self.dst.as_mut_ptr().add(i), v);
            }
        }
    }

    /// `op` (or the division) of every element of `src` on `backend`.
    fn run<T: Element>(backend: Backend, op: Option<SqrtOver<T>>, d: T, src: &[T], dst: &mut [T]) {
        run_on(backend, op, false, d, src, dst);
    }

    /// `run` of `src` itself (`no_root`) or of its roots.
    fn run_on<T: Element>(
        backend: Backend,
        op: Option<SqrtOver<T>>,
        no_root: bool,
        d: T,
        src: &[T],
        dst: &mut [T],
    ) {
        let n = src.len();
        let mut block = Apply {
            op,
            no_root,
            divisor: d,
            src,
            dst,
        };
        // SAFETY: both slices hold n elements.
        unsafe { run_block(backend, n, &mut block) };
    }

    /// The divisors Adam meets: `sqrt(1 − β2^t)` for common and extreme β2
    /// (late steps too, where it nears 1), and the ends of the range it is used in
    /// (also the largest value below 1, whose reciprocal is the hardest).
    fn divisors<T: Element>() -> Vec<T> {
        let mut out = vec![T::ONE, T::from_f64(2f64.powi(-27))];
        for (beta2, t) in [
            (0.999f64, 1.0),
            (0.999, 10.0),
            (0.99, 3.0),
            (0.9999, 1.0),
            (0.5, 2.0),
            (0.999, 5000.0),
        ] {
            out.push(T::from_f64((1.0 - beta2.powf(t)).powf(0.5)));
        }
        out.push(T::from_f64((f64::EPSILON / 2.0).sqrt()));
        let below_one = T::ONE - T::from_f64(f64::EPSILON / 2.0);
        out.push(if below_one < T::ONE {
            below_one
        } else {
            T::from_f64(1.0 - f32::EPSILON as f64 / 2.0)
        });
        out
    }

    /// Lanes of `backend` that differ from the division (whose vector and
    /// scalar forms are both IEEE-exact), over the bit patterns `x` from 0
    /// upwards in steps of `stride`: every non-negative f32, NaN and infinity
    /// included, when 1 (negative inputs give NaN either way), plus -0 and -1.
    fn mismatches(backend: Backend, d: f32, stride: u32) -> u64 {
        let chunk = 1 << 16;
        let (mut src, mut got, mut want) =
            (vec![0f32; chunk], vec![0f32; chunk], vec![0f32; chunk]);
        let mut bad = 0;
        let ends = [0x8000_0000, (-1f32).to_bits()];
        let last = 0x7fff_ffffu64 / stride as u64;
        let mut k = 0u64;
        loop {
            let n = (last + 1 + ends.len() as u64 - k).min(chunk as u64) as usize;
            if n == 0 {
                return bad;
            }
            for (i, x) in src[..n].iter_mut().enumerate() {
                let j = k + i as u64;
                let bits = if j <= last {
                    (j * stride as u64) as u32
                } else {
                    ends[(j - last - 1) as usize]
                };
                *x = f32::from_bits(bits);
            }
            k += n as u64;
            run(backend, Some(SqrtOver::new(d)), d, &src[..n], &mut got[..n]);
            run(backend, None, d, &src[..n], &mut want[..n]);
            bad += got[..n]
                .iter()
                .zip(&want[..n])
                .filter(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()))
                .count() as u64;
        }
    }

    #[test]
    fn equals_the_division_for_every_f32() {
        // Every input on the backend this machine runs, for the divisors
        // of the hardest shapes (tiny, a first step, later steps); a stride
        // of inputs on every backend for all of them.
        // `OXOPTIM_EXHAUSTIVE_DIVISORS` lowers the count where every input is
        // slow to run (an emulated CPU: `make test-aarch64`).
        let exhaustive = if cfg!(debug_assertions) {
            0
        } else {
            std::env::var("OXOPTIM_EXHAUSTIVE_DIVISORS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(4, |n| n.min(4))
        };
        let all = divisors::<f32>();
        for &d in &all[1..1 + exhaustive] {
            assert_eq!(
                mismatches(Backend::active(), d, 1),
                0,
                "{} d={d:e}",
                Backend::active().name()
            );
        }
        for backend in Backend::supported() {
            for &d in &all {
                assert_eq!(
                    mismatches(backend, d, 4099),
                    0,
                    "{} d={d:e}",
                    backend.name()
                );
            }
        }
    }

    /// A seeded xorshift64 stream: reproducible test inputs without a crate.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// f64 has too many inputs to try them all: random bit patterns over the
    /// whole non-negative range, mantissas just below a power of two, and
    /// the ends (0, -0, subnormals, the largest, infinity, NaN, negatives).
    #[test]
    fn equals_the_division_for_sampled_f64() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut src: Vec<f64> = (0..1 << 16)
            .map(|i| {
                let r = next();
                let bits = if i % 2 == 0 {
                    r >> 1
                } else {
                    (r >> 1 & 0x7ff0_0000_0000_0000) | ((1 << 52) - 1 - (r & 0xfff))
                };
                f64::from_bits(bits)
            })
            .collect();
        src.extend([
            0.0,
            -0.0,
            f64::from_bits(1),
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::INFINITY,
            f64::NAN,
            -1.0,
            -f64::from_bits(1),
        ]);
        let (mut got, mut want) = (vec![0f64; src.len()], vec![0f64; src.len()]);
        for backend in Backend::supported() {
            for &d in &divisors::<f64>() {
                run(backend, Some(SqrtOver::new(d)), d, &src, &mut got);
                run(backend, None, d, &src, &mut want);
                let bad = got
                    .iter()
                    .zip(&want)
                    .filter(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()))
                    .count();
                assert_eq!(bad, 0, "{} d={d:e}", backend.name());
            }
        }
    }

    /// The hardest f64 quotients: `a / d` as close to a rounding midpoint as
    /// two 53-bit numbers allow (`M·D = A·2^54 + t`, `M` odd, `t` small and
    /// odd), where the uncorrected product is wrong about half the time.
    #[test]
    fn equals_the_division_next_to_f64_midpoints() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let (top, mask) = (1u128 << 52, (1u128 << 54) - 1);
        let mut hard = 0;
        for backend in Backend::supported() {
            for i in 0..400 {
                // Odd mantissas, a quarter of them just below 2 (d near 1).
                let dm = if i % 4 == 0 {
                    2 * top - 1 - 2 * (next() as u128 & 0xffff)
                } else {
                    top | (next() as u128 & (top - 1)) | 1
                };
                let mut inv = dm; // dm⁻¹ mod 2^54 (Newton, each step doubles the bits)
                for _ in 0..6 {
                    inv = inv.wrapping_mul(2u128.wrapping_sub(dm.wrapping_mul(inv))) & mask;
                }
                let mut roots = vec![];
                for t in [1i128, -1, 3, -3, 5, -5, 7, -7] {
                    let m = (t.rem_euclid(1 << 54) as u128).wrapping_mul(inv) & mask;
                    let a = ((m * dm) as i128 - t) >> 54;
                    if m >> 53 == 1 && (top as i128..2 * top as i128).contains(&a) {
                        roots.push(f64::from_bits(
                            0x3ff0_0000_0000_0000 | (a as u64 & (top as u64 - 1)),
                        ));
                    }
                }
                let d = f64::from_bits(0x3fe0_0000_0000_0000 | (dm as u64 & (top as u64 - 1)));
                let (mut got, mut want) = (vec![0f64; roots.len()], vec![0f64; roots.len()]);
                run_on(backend, Some(SqrtOver::new(d)), true, d, &roots, &mut got);
                run_on(backend, None, true, d, &roots, &mut want);
                for ((g, w), a) in got.iter().zip(&want).zip(&roots) {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{} a={a:e} d={d:e}",
                        backend.name()
                    );
                    hard += usize::from((a * (1.0 / d)).to_bits() != w.to_bits());
                }
            }
        }
        assert!(hard > 100, "only {hard} quotients the product gets wrong");
    }

    /// Divisors whose reciprocal rounds by nearly half an ulp and whose
    /// significand is nearly 2: there `q` can be 1.5 ulp off and `r` can
    /// round, the only place the correction could land on the wrong side of
    /// a midpoint (a quotient of two f32 is at least 2^-25 ulp from one).
    fn hardest_divisors(count: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(count);
        let mut bits = 2f32.to_bits() - 1; // significand all ones, in [1, 2)
        while out.len() < count {
            let d = f32::from_bits(bits);
            let error = ((1.0 / d) as f64 * d as f64 - 1.0).abs();
            if error > 0.9 * d as f64 * 2f64.powi(-25) {
                out.push(d * 2f32.powi(-4)); // into Adam's (0, 1]; scaling by 2^k changes no bit of the result
            }
            bits -= 1;
        }
        out
    }

    #[test]
    fn equals_the_division_for_the_hardest_divisors() {
        // Every root significand in [1, 4) (all quotient significands), on
        // the backend this machine runs; a few divisors in debug builds.
        let count = if cfg!(debug_assertions) { 2 } else { 24 };
        let backend = Backend::active();
        let roots: Vec<f32> = (1f32.to_bits()..4f32.to_bits())
            .map(f32::from_bits)
            .collect();
        let (mut got, mut want) = (vec![0f32; roots.len()], vec![0f32; roots.len()]);
        for d in hardest_divisors(count) {
            run_on(backend, Some(SqrtOver::new(d)), true, d, &roots, &mut got);
            run_on(backend, None, true, d, &roots, &mut want);
            let bad = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(bad, 0, "{} d={d:e}", backend.name());
        }
    }

    #[test]
    fn divides_outside_its_range() {
        for d in [2.0f32, 1e-9, f32::INFINITY] {
            assert!(SqrtOver::new(d).reciprocal.is_none(), "{d}");
        }
        assert!(SqrtOver::new(1e-8f32).reciprocal.is_some());
    }
}
