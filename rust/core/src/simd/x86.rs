//! x86_64 vector paths: AVX2+FMA (256-bit), AVX-512F (512-bit), and
//! AVX-512 with VBMI (the same, with byte-permute 8-bit coding).
//!
//! The types are zero-sized tokens; holding one means every CPU feature its
//! code is compiled with was detected (see `cpu_path!`), which is what makes
//! the intrinsics sound.

use super::{Lanes, Real};
use crate::quant::{Codebook, BUCKETS, HAS_MIDPOINT, KEY_BASE, KEY_SHIFT};
use crate::rounding::{StreamKey, BF16_NAN_BITS};
use std::arch::x86_64::*;

cpu_path!(
    /// Token for AVX2 + FMA. Only constructed after runtime detection.
    Avx2,
    detect = is_x86_feature_detected,
    features = ["avx2", "fma"]
);

cpu_path!(
    /// Token for AVX-512F; its kernels' scalar tails and glue also use AVX2
    /// and FMA. Only constructed after runtime detection.
    Avx512,
    detect = is_x86_feature_detected,
    features = ["avx512f", "avx2", "fma"]
);

cpu_path!(
    /// Token for AVX-512F with BW and VBMI's byte permutes, which code 8-bit
    /// state 64 values at a time (`x86_vbmi`); otherwise as [`Avx512`].
    /// Only constructed after runtime detection.
    Avx512Vbmi,
    detect = is_x86_feature_detected,
    features = ["avx512f", "avx512bw", "avx512vbmi", "avx2", "fma"]
);

// SAFETY (whole module): every method below runs an intrinsic of the token's
// instruction set; a token exists only if that set was detected at run time.
// The `load`/`store` pointer requirements are forwarded to the caller.
macro_rules! impl_lanes {
    ($token:ty, $t:ty, $v:ty, $width:expr,
     set1=$set1:ident, loadu=$loadu:ident, storeu=$storeu:ident,
     add=$add:ident, sub=$sub:ident, mul=$mul:ident, div=$div:ident,
     sqrt=$sqrt:ident, fmadd=$fmadd:ident,
     max_nan=|$ma:ident, $mb:ident| $max_body:expr,
     abs=|$av:ident| $abs_body:expr,
     sign=|$sv:ident| $sign_body:expr,
     lt_select=|$la:ident, $lb:ident, $lthen:ident, $lelse:ident| $lt_body:expr,
     reduce=|$rv:ident| $reduce_body:expr,
     nonfinite=|$nv:ident| $nonfinite_body:expr
     $(, codes = { $($codes:item)* })?) => {
        impl Lanes<$t> for $token {
            type V = $v;
            const WIDTH: usize = $width;
            $($($codes)*)?

            #[inline(always)]
            fn splat(self, x: $t) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $set1(x) }
            }
            #[inline(always)]
            unsafe fn load(self, ptr: *const $t) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $loadu(ptr) }
            }
            #[inline(always)]
            unsafe fn store(self, ptr: *mut $t, v: $v) {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $storeu(ptr, v) }
            }
            #[inline(always)]
            fn add(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $add(a, b) }
            }
            #[inline(always)]
            fn sub(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $sub(a, b) }
            }
            #[inline(always)]
            fn mul(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            fn div(self, a: $v, b: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $div(a, b) }
            }
            #[inline(always)]
            fn sqrt(self, a: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $sqrt(a) }
            }
            #[inline(always)]
            fn mul_add(self, a: $v, b: $v, c: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $fmadd(a, b, c) }
            }
            #[inline(always)]
            fn max(self, $ma: $v, $mb: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $max_body }
            }
            #[inline(always)]
            fn abs(self, $av: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $abs_body }
            }
            #[inline(always)]
            fn sign(self, $sv: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $sign_body }
            }
            #[inline(always)]
            fn lt_select(self, $la: $v, $lb: $v, $lthen: $v, $lelse: $v) -> $v {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $lt_body }
            }
            #[inline(always)]
            fn reduce_sum(self, $rv: $v) -> $t {
                #[allow(unused_unsafe)]
                // SAFETY: see the module note (token proves the ISA).
                unsafe {
                    $reduce_body
                }
            }
            #[inline(always)]
            fn any_nonfinite(self, $nv: $v) -> bool {
                // SAFETY: see the module note (token proves the ISA).
                unsafe { $nonfinite_body }
            }
        }
    };
}

/// Adds lanes strictly left to right, matching the scalar reference order.
#[inline(always)]
fn sum_in_order<T: Real, const N: usize>(lanes: [T; N]) -> T {
    let mut acc = lanes[0];
    for &x in &lanes[1..] {
        acc = acc + x;
    }
    acc
}

impl_lanes!(
    Avx2,
    f32,
    __m256,
    8,
    set1 = _mm256_set1_ps,
    loadu = _mm256_loadu_ps,
    storeu = _mm256_storeu_ps,
    add = _mm256_add_ps,
    sub = _mm256_sub_ps,
    mul = _mm256_mul_ps,
    div = _mm256_div_ps,
    sqrt = _mm256_sqrt_ps,
    fmadd = _mm256_fmadd_ps,
    max_nan = |a, b| {
        // a where a > b or a is NaN, else b (b NaN falls through to b).
        let take_a = _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(a, b),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a),
        );
        _mm256_blendv_ps(b, a, take_a)
    },
    abs = |a| _mm256_andnot_ps(_mm256_set1_ps(-0.0), a),
    sign = |v| {
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let pos = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, zero), one);
        let neg = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(v, zero), one);
        _mm256_sub_ps(pos, neg)
    },
    lt_select = |a, b, then, otherwise| _mm256_blendv_ps(
        otherwise,
        then,
        _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)
    ),
    reduce = |v| sum_in_order(std::mem::transmute::<__m256, [f32; 8]>(v)),
    nonfinite = |v| {
        let d = _mm256_sub_ps(v, v);
        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(d, d)) != 0
    },
    codes = {
        #[inline(always)]
        fn max_magnitude(self, acc: __m256, x: __m256) -> __m256 {
            // Magnitudes order as their bits, NaN above infinity: one integer max.
            // SAFETY: see the module note.
            unsafe {
                let bits = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fff_ffff));
                _mm256_castsi256_ps(_mm256_max_epu32(_mm256_castps_si256(acc), bits))
            }
        }
        #[inline(always)]
        unsafe fn dequantize(self, codes: *const u8, book: &Codebook, scale: f32) -> __m256 {
            // SAFETY: see the module note; `codes` holds 8 bytes (caller),
            // every code indexes the 256 values.
            unsafe {
                let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes as *const __m128i));
                let v = _mm256_i32gather_ps::<4>(book.values.as_ptr(), idx);
                _mm256_mul_ps(v, _mm256_set1_ps(scale))
            }
        }
        #[inline(always)]
        unsafe fn widen_bf16(self, src: *const u16) -> __m256 {
            // SAFETY: see the module note; `src` holds 8 u16 (caller).
            unsafe {
                let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(src as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
            }
        }
        #[inline(always)]
        fn round_bf16(self, x: __m256) -> __m256 {
            // SAFETY: see the module note.
            unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(nearest_bf16_avx2(x))) }
        }
        #[inline(always)]
        unsafe fn narrow_bf16_nearest(self, x: __m256, out: *mut u16) {
            // SAFETY: see the module note; `out` holds 8 u16 (caller).
            unsafe {
                let halves = nearest_bf16_avx2(x);
                let packed = _mm_packus_epi32(
                    _mm256_castsi256_si128(halves),
                    _mm256_extracti128_si256::<1>(halves),
                );
                _mm_storeu_si128(out as *mut __m128i, packed);
            }
        }
        #[inline(always)]
        unsafe fn narrow_bf16_stochastic(
            self,
            x: __m256,
            first: u32,
            key: StreamKey,
            out: *mut u16,
        ) {
            // SAFETY: see the module note; `out` holds 8 u16 (caller).
            unsafe {
                let index = _mm256_add_epi32(
                    _mm256_set1_epi32(first as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                let h = lowbias32_avx2(_mm256_xor_si256(index, _mm256_set1_epi32(key.k1 as i32)));
                let h = lowbias32_avx2(_mm256_add_epi32(h, _mm256_set1_epi32(key.k2 as i32)));
                let sum = _mm256_add_epi32(
                    _mm256_castps_si256(x),
                    _mm256_and_si256(h, _mm256_set1_epi32(0xffff)),
                );
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                let halves = _mm256_blendv_epi8(
                    _mm256_srli_epi32::<16>(sum),
                    _mm256_set1_epi32(BF16_NAN_BITS as i32),
                    nan,
                );
                let packed = _mm_packus_epi32(
                    _mm256_castsi256_si128(halves),
                    _mm256_extracti128_si256::<1>(halves),
                );
                _mm_storeu_si128(out as *mut __m128i, packed);
            }
        }
        #[inline(always)]
        unsafe fn quantize(self, x: __m256, book: &Codebook, out: *mut u8) {
            // SAFETY: see the module note; every bucket indexes the entries
            // (clamped like the scalar path); `out` holds 8 bytes (caller).
            unsafe {
                let bits = _mm256_castps_si256(x);
                let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
                let bucket = _mm256_sub_epi32(
                    _mm256_srli_epi32::<{ KEY_SHIFT as i32 }>(magnitude),
                    _mm256_set1_epi32(KEY_BASE as i32),
                );
                let bucket = _mm256_min_epi32(
                    _mm256_max_epi32(bucket, _mm256_setzero_si256()),
                    _mm256_set1_epi32(BUCKETS as i32 - 1),
                );
                // An ordered compare: NaN codes as positive (+inf), as the scalar path.
                let negative =
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps()));
                let bucket = _mm256_add_epi32(
                    bucket,
                    _mm256_and_si256(negative, _mm256_set1_epi32(BUCKETS as i32)),
                );
                let entry = _mm256_i32gather_epi32::<4>(book.entries_ptr() as *const i32, bucket);
                let low = _mm256_and_si256(magnitude, _mm256_set1_epi32((1 << KEY_SHIFT) - 1));
                let split = _mm256_srli_epi32::<16>(entry);
                let above = _mm256_blendv_epi8(
                    _mm256_cmpgt_epi32(low, split),
                    _mm256_cmpgt_epi32(split, low),
                    negative,
                );
                let has = _mm256_set1_epi32(HAS_MIDPOINT as i32);
                let up =
                    _mm256_and_si256(above, _mm256_cmpeq_epi32(_mm256_and_si256(entry, has), has));
                // code + 1 where `up` (-1 there).
                let code = _mm256_sub_epi32(_mm256_and_si256(entry, _mm256_set1_epi32(0xff)), up);
                let words = _mm_packus_epi32(
                    _mm256_castsi256_si128(code),
                    _mm256_extracti128_si256::<1>(code),
                );
                _mm_storel_epi64(out as *mut __m128i, _mm_packus_epi16(words, words));
            }
        }
    }
);

impl_lanes!(
    Avx2,
    f64,
    __m256d,
    4,
    set1 = _mm256_set1_pd,
    loadu = _mm256_loadu_pd,
    storeu = _mm256_storeu_pd,
    add = _mm256_add_pd,
    sub = _mm256_sub_pd,
    mul = _mm256_mul_pd,
    div = _mm256_div_pd,
    sqrt = _mm256_sqrt_pd,
    fmadd = _mm256_fmadd_pd,
    max_nan = |a, b| {
        let take_a = _mm256_or_pd(
            _mm256_cmp_pd::<_CMP_GT_OQ>(a, b),
            _mm256_cmp_pd::<_CMP_UNORD_Q>(a, a),
        );
        _mm256_blendv_pd(b, a, take_a)
    },
    abs = |a| _mm256_andnot_pd(_mm256_set1_pd(-0.0), a),
    sign = |v| {
        let zero = _mm256_setzero_pd();
        let one = _mm256_set1_pd(1.0);
        let pos = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(v, zero), one);
        let neg = _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(v, zero), one);
        _mm256_sub_pd(pos, neg)
    },
    lt_select = |a, b, then, otherwise| _mm256_blendv_pd(
        otherwise,
        then,
        _mm256_cmp_pd::<_CMP_LT_OQ>(a, b)
    ),
    reduce = |v| sum_in_order(std::mem::transmute::<__m256d, [f64; 4]>(v)),
    nonfinite = |v| {
        let d = _mm256_sub_pd(v, v);
        _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_UNORD_Q>(d, d)) != 0
    }
);

/// The f32 lanes of the AVX-512 tokens (`extra`: a token's own methods).
macro_rules! avx512_f32 {
    ($token:ty $(, extra = { $($extra:item)* })?) => {
        impl_lanes!(
            $token,
            f32,
            __m512,
            16,
            set1 = _mm512_set1_ps,
            loadu = _mm512_loadu_ps,
            storeu = _mm512_storeu_ps,
            add = _mm512_add_ps,
            sub = _mm512_sub_ps,
            mul = _mm512_mul_ps,
            div = _mm512_div_ps,
            sqrt = _mm512_sqrt_ps,
            fmadd = _mm512_fmadd_ps,
            max_nan = |a, b| {
                let take_a =
                    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a);
                _mm512_mask_blend_ps(take_a, b, a)
            },
            abs = |a| _mm512_abs_ps(a),
            sign = |v| {
                let zero = _mm512_setzero_ps();
                let one = _mm512_set1_ps(1.0);
                let pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, zero), one);
                let neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero), one);
                _mm512_sub_ps(pos, neg)
            },
            lt_select = |a, b, then, otherwise| _mm512_mask_blend_ps(
                _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b),
                otherwise,
                then
            ),
            reduce = |v| sum_in_order(std::mem::transmute::<__m512, [f32; 16]>(v)),
            nonfinite = |v| {
                let d = _mm512_sub_ps(v, v);
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(d, d) != 0
            },
            codes = {
                $($($extra)*)?
                #[inline(always)]
                fn max_magnitude(self, acc: __m512, x: __m512) -> __m512 {
                    // Magnitudes order as their bits, NaN above infinity: one integer max.
                    // SAFETY: see the module note.
                    unsafe {
                        let bits = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fff_ffff));
                        _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(acc), bits))
                    }
                }
                #[inline(always)]
                unsafe fn dequantize(self, codes: *const u8, book: &Codebook, scale: f32) -> __m512 {
                    // Sixteen scalar loads beat a gather here. SAFETY: see the AVX2 version.
                    unsafe {
                        let mut lanes = [0f32; 16];
                        for (i, lane) in lanes.iter_mut().enumerate() {
                            *lane = *book.values.get_unchecked(*codes.add(i) as usize);
                        }
                        _mm512_mul_ps(_mm512_loadu_ps(lanes.as_ptr()), _mm512_set1_ps(scale))
                    }
                }
                #[inline(always)]
                unsafe fn widen_bf16(self, src: *const u16) -> __m512 {
                    // SAFETY: see the module note; `src` holds 16 u16 (caller).
                    unsafe {
                        let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(src as *const __m256i));
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
                    }
                }
                #[inline(always)]
                fn round_bf16(self, x: __m512) -> __m512 {
                    // SAFETY: see the module note.
                    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(nearest_bf16_avx512(x))) }
                }
                #[inline(always)]
                unsafe fn narrow_bf16_nearest(self, x: __m512, out: *mut u16) {
                    // SAFETY: see the module note; `out` holds 16 u16 (caller).
                    unsafe {
                        let halves = nearest_bf16_avx512(x);
                        _mm256_storeu_si256(out as *mut __m256i, _mm512_cvtepi32_epi16(halves));
                    }
                }
                #[inline(always)]
                unsafe fn narrow_bf16_stochastic(
                    self,
                    x: __m512,
                    first: u32,
                    key: StreamKey,
                    out: *mut u16,
                ) {
                    // SAFETY: see the module note; `out` holds 16 u16 (caller).
                    unsafe {
                        let index = _mm512_add_epi32(
                            _mm512_set1_epi32(first as i32),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                        );
                        let h = lowbias32_avx512(_mm512_xor_si512(index, _mm512_set1_epi32(key.k1 as i32)));
                        let h = lowbias32_avx512(_mm512_add_epi32(h, _mm512_set1_epi32(key.k2 as i32)));
                        let sum = _mm512_add_epi32(
                            _mm512_castps_si512(x),
                            _mm512_and_si512(h, _mm512_set1_epi32(0xffff)),
                        );
                        let halves = _mm512_mask_blend_epi32(
                            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x),
                            _mm512_srli_epi32::<16>(sum),
                            _mm512_set1_epi32(BF16_NAN_BITS as i32),
                        );
                        _mm256_storeu_si256(out as *mut __m256i, _mm512_cvtepi32_epi16(halves));
                    }
                }
                #[inline(always)]
                unsafe fn quantize(self, x: __m512, book: &Codebook, out: *mut u8) {
                    // SAFETY: see the AVX2 version; `out` holds 16 bytes (caller).
                    unsafe {
                        let bits = _mm512_castps_si512(x);
                        let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
                        let bucket = _mm512_sub_epi32(
                            _mm512_srli_epi32::<{ KEY_SHIFT }>(magnitude),
                            _mm512_set1_epi32(KEY_BASE as i32),
                        );
                        let bucket = _mm512_min_epi32(
                            _mm512_max_epi32(bucket, _mm512_setzero_si512()),
                            _mm512_set1_epi32(BUCKETS as i32 - 1),
                        );
                        // An ordered compare: NaN codes as positive (+inf), as the scalar path.
                let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
                        let bucket = _mm512_mask_add_epi32(
                            bucket,
                            negative,
                            bucket,
                            _mm512_set1_epi32(BUCKETS as i32),
                        );
                        // Sixteen scalar loads beat a gather here.
                        let mut keys = [0u32; 16];
                        _mm512_storeu_si512(keys.as_mut_ptr() as *mut __m512i, bucket);
                        let mut entries = [0u32; 16];
                        for (e, &k) in entries.iter_mut().zip(&keys) {
                            *e = *book.entries_ptr().add(k as usize);
                        }
                        let entry = _mm512_loadu_si512(entries.as_ptr() as *const __m512i);
                        let low = _mm512_and_si512(magnitude, _mm512_set1_epi32((1 << KEY_SHIFT) - 1));
                        let split = _mm512_srli_epi32::<16>(entry);
                        let above = (_mm512_cmpgt_epi32_mask(low, split) & !negative)
                            | (_mm512_cmplt_epi32_mask(low, split) & negative);
                        let up =
                            above & _mm512_test_epi32_mask(entry, _mm512_set1_epi32(HAS_MIDPOINT as i32));
                        let code = _mm512_and_si512(entry, _mm512_set1_epi32(0xff));
                        let code = _mm512_mask_add_epi32(code, up, code, _mm512_set1_epi32(1));
                        _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(code));
                    }
                }
            }
        );
    };
}

avx512_f32!(Avx512);

avx512_f32!(
    Avx512Vbmi,
    extra = {
        const CODE_RUN: usize = 64;
        #[inline(always)]
        unsafe fn dequantize_many(
            self,
            codes: *const u8,
            n: usize,
            book: &Codebook,
            scale: f32,
            out: *mut f32,
        ) {
            // SAFETY: the token proves AVX-512 F/BW/VBMI; the pointers are the caller's.
            unsafe { super::x86_vbmi::dequantize(codes, n, book, scale, out) }
        }
        #[inline(always)]
        unsafe fn quantize_many(
            self,
            src: *const f32,
            n: usize,
            inv: f32,
            book: &Codebook,
            out: *mut u8,
        ) {
            // SAFETY: as `dequantize_many`.
            unsafe { super::x86_vbmi::quantize(src, n, inv, book, out) }
        }
    }
);

impl_lanes!(
    Avx512,
    f64,
    __m512d,
    8,
    set1 = _mm512_set1_pd,
    loadu = _mm512_loadu_pd,
    storeu = _mm512_storeu_pd,
    add = _mm512_add_pd,
    sub = _mm512_sub_pd,
    mul = _mm512_mul_pd,
    div = _mm512_div_pd,
    sqrt = _mm512_sqrt_pd,
    fmadd = _mm512_fmadd_pd,
    max_nan = |a, b| {
        let take_a =
            _mm512_cmp_pd_mask::<_CMP_GT_OQ>(a, b) | _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(a, a);
        _mm512_mask_blend_pd(take_a, b, a)
    },
    abs = |a| _mm512_abs_pd(a),
    sign = |v| {
        let zero = _mm512_setzero_pd();
        let one = _mm512_set1_pd(1.0);
        let pos = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(v, zero), one);
        let neg = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_LT_OQ>(v, zero), one);
        _mm512_sub_pd(pos, neg)
    },
    lt_select = |a, b, then, otherwise| _mm512_mask_blend_pd(
        _mm512_cmp_pd_mask::<_CMP_LT_OQ>(a, b),
        otherwise,
        then
    ),
    reduce = |v| sum_in_order(std::mem::transmute::<__m512d, [f64; 8]>(v)),
    nonfinite = |v| {
        let d = _mm512_sub_pd(v, v);
        _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(d, d) != 0
    }
);

/// [`crate::rounding::lowbias32`] on eight lanes.
#[inline(always)]
unsafe fn lowbias32_avx2(mut x: __m256i) -> __m256i {
    // SAFETY: only called from AVX2 code (see the module note).
    unsafe {
        x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
        x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb_352d));
        x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
        x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846c_a68bu32 as i32));
        _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
    }
}

/// [`crate::rounding::lowbias32`] on sixteen lanes.
#[inline(always)]
unsafe fn lowbias32_avx512(mut x: __m512i) -> __m512i {
    // SAFETY: only called from AVX-512 code (see the module note).
    unsafe {
        x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
        x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb_352d));
        x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
        x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846c_a68bu32 as i32));
        _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
    }
}

/// The bfloat16 bits (low half of each lane) of `x` rounded to nearest even,
/// NaN quieted with its sign and payload kept (`half::bf16::from_f32`).
#[inline(always)]
unsafe fn nearest_bf16_avx2(x: __m256) -> __m256i {
    // SAFETY: only called from AVX2 code (see the module note).
    unsafe {
        let bits = _mm256_castps_si256(x);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
            bits,
            _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)),
        ));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        _mm256_blendv_epi8(rounded, quiet, nan)
    }
}

/// [`nearest_bf16_avx2`] on sixteen lanes.
#[inline(always)]
unsafe fn nearest_bf16_avx512(x: __m512) -> __m512i {
    // SAFETY: only called from AVX-512 code (see the module note).
    unsafe {
        let bits = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            bits,
            _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)),
        ));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), rounded, quiet)
    }
}
