//! The scalar reference: one lane, plain Rust arithmetic.

use super::{Lanes, Real};

/// One-lane "vector": the reference every SIMD path is tested against.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scalar;

impl<T: Real> Lanes<T> for Scalar {
    type V = T;
    const WIDTH: usize = 1;

    #[inline(always)]
    fn splat(self, x: T) -> T {
        x
    }
    #[inline(always)]
    unsafe fn load(self, ptr: *const T) -> T {
        // SAFETY: the caller guarantees `ptr` is readable for one element.
        unsafe { ptr.read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut T, v: T) {
        // SAFETY: the caller guarantees `ptr` is writable for one element.
        unsafe { ptr.write_unaligned(v) }
    }
    #[inline(always)]
    fn add(self, a: T, b: T) -> T {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: T, b: T) -> T {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: T, b: T) -> T {
        a * b
    }
    #[inline(always)]
    fn div(self, a: T, b: T) -> T {
        a / b
    }
    #[inline(always)]
    fn sqrt(self, a: T) -> T {
        a.sqrt()
    }
    #[inline(always)]
    fn mul_add(self, a: T, b: T, c: T) -> T {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn max(self, a: T, b: T) -> T {
        if a > b || a.is_nan() {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn abs(self, a: T) -> T {
        a.abs()
    }
    #[inline(always)]
    fn sign(self, a: T) -> T {
        let pos = if a > T::ZERO { T::ONE } else { T::ZERO };
        let neg = if a < T::ZERO { T::ONE } else { T::ZERO };
        pos - neg
    }
    #[inline(always)]
    fn lt_select(self, a: T, b: T, then: T, otherwise: T) -> T {
        if a < b {
            then
        } else {
            otherwise
        }
    }
    #[inline(always)]
    fn reduce_sum(self, v: T) -> T {
        v
    }
    #[inline(always)]
    fn any_nonfinite(self, v: T) -> bool {
        #[allow(clippy::eq_op)] // x - x is NaN exactly for NaN and ±inf
        (v - v).is_nan()
    }
}
