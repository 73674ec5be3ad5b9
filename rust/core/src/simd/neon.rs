//! aarch64 NEON path (128-bit): 4 f32 or 2 f64 lanes.

use super::{Lanes, Real};
use std::arch::aarch64::*;

cpu_path!(
    /// Token for NEON. Only constructed after runtime detection.
    Neon,
    detect = is_aarch64_feature_detected,
    features = ["neon"]
);

/// Adds lanes strictly left to right, matching the scalar reference order.
#[inline(always)]
fn sum_in_order<T: Real, const N: usize>(lanes: [T; N]) -> T {
    let mut acc = lanes[0];
    for &x in &lanes[1..] {
        acc = acc + x;
    }
    acc
}

// SAFETY (whole module): the intrinsics need NEON, which a `Neon` token proves.
macro_rules! impl_lanes {
    ($t:ty, $v:ty, $width:expr, $bits:ty,
     dup=$dup:ident, ld=$ld:ident, st=$st:ident, add=$add:ident, sub=$sub:ident,
     mul=$mul:ident, div=$div:ident, sqrt=$sqrt:ident, fma=$fma:ident,
     cgt=$cgt:ident, clt=$clt:ident, ceq=$ceq:ident, abs=$abs:ident, orr=$orr:ident, bsl=$bsl:ident, mvn_any=|$m:ident| $any:expr) => {
        impl Lanes<$t> for Neon {
            type V = $v;
            const WIDTH: usize = $width;

            #[inline(always)]
            fn splat(self, x: $t) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $dup(x) }
            }
            #[inline(always)]
            unsafe fn load(self, ptr: *const $t) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $ld(ptr) }
            }
            #[inline(always)]
            unsafe fn store(self, ptr: *mut $t, v: $v) {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $st(ptr, v) }
            }
            #[inline(always)]
            fn add(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $add(a, b) }
            }
            #[inline(always)]
            fn sub(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $sub(a, b) }
            }
            #[inline(always)]
            fn mul(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            fn div(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $div(a, b) }
            }
            #[inline(always)]
            fn sqrt(self, a: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $sqrt(a) }
            }
            #[inline(always)]
            fn mul_add(self, a: $v, b: $v, c: $v) -> $v {
                // vfmaq(c, a, b) = c + a * b, one rounding.
                // SAFETY: see the module note (token proves NEON).
                unsafe { $fma(c, a, b) }
            }
            #[inline(always)]
            fn max(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe {
                    // a where a > b or a is NaN (a != a), else b.
                    let a_nan: $bits = $ceq(a, a);
                    let take_a = $orr($cgt(a, b), vmvnq_u32_or_u64(a_nan));
                    $bsl(take_a, a, b)
                }
            }
            #[inline(always)]
            fn abs(self, a: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $abs(a) }
            }
            #[inline(always)]
            fn sign(self, a: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe {
                    let zero = $dup(0.0);
                    let one = $dup(1.0);
                    let pos = $bsl($cgt(a, zero), one, zero);
                    let neg = $bsl($clt(a, zero), one, zero);
                    $sub(pos, neg)
                }
            }
            #[inline(always)]
            fn lt_select(self, a: $v, b: $v, then: $v, otherwise: $v) -> $v {
                // SAFETY: see the module note (token proves NEON).
                unsafe { $bsl($clt(a, b), then, otherwise) }
            }
            #[inline(always)]
            fn reduce_sum(self, v: $v) -> $t {
                // SAFETY: see the module note (token proves NEON).
                sum_in_order(unsafe { std::mem::transmute::<$v, [$t; $width]>(v) })
            }
            #[inline(always)]
            fn any_nonfinite(self, v: $v) -> bool {
                // SAFETY: see the module note (token proves NEON).
                unsafe {
                    let d = $sub(v, v);
                    let $m: $bits = $ceq(d, d);
                    $any
                }
            }
        }
    };
}

/// Bitwise NOT for either mask width (NEON has no 64-bit `vmvnq`).
trait NotMask {
    fn not(self) -> Self;
}
impl NotMask for uint32x4_t {
    #[inline(always)]
    fn not(self) -> Self {
        // SAFETY: see the module note (token proves NEON).
        unsafe { vmvnq_u32(self) }
    }
}
impl NotMask for uint64x2_t {
    #[inline(always)]
    fn not(self) -> Self {
        // SAFETY: see the module note (token proves NEON).
        unsafe { vreinterpretq_u64_u32(vmvnq_u32(vreinterpretq_u32_u64(self))) }
    }
}
#[inline(always)]
fn vmvnq_u32_or_u64<M: NotMask>(m: M) -> M {
    m.not()
}

impl_lanes!(
    f32,
    float32x4_t,
    4,
    uint32x4_t,
    dup = vdupq_n_f32,
    ld = vld1q_f32,
    st = vst1q_f32,
    add = vaddq_f32,
    sub = vsubq_f32,
    mul = vmulq_f32,
    div = vdivq_f32,
    sqrt = vsqrtq_f32,
    fma = vfmaq_f32,
    cgt = vcgtq_f32,
    clt = vcltq_f32,
    ceq = vceqq_f32,
    abs = vabsq_f32,
    orr = vorrq_u32,
    bsl = vbslq_f32,
    mvn_any = |m| vminvq_u32(m) == 0
);

impl_lanes!(
    f64,
    float64x2_t,
    2,
    uint64x2_t,
    dup = vdupq_n_f64,
    ld = vld1q_f64,
    st = vst1q_f64,
    add = vaddq_f64,
    sub = vsubq_f64,
    mul = vmulq_f64,
    div = vdivq_f64,
    sqrt = vsqrtq_f64,
    fma = vfmaq_f64,
    cgt = vcgtq_f64,
    clt = vcltq_f64,
    ceq = vceqq_f64,
    abs = vabsq_f64,
    orr = vorrq_u64,
    bsl = vbslq_f64,
    mvn_any = |m| vminvq_u32(vreinterpretq_u32_u64(m)) == 0
);
