//! 8-bit coding 64 values at a time with AVX-512 VBMI byte permutes and
//! the byte tables of [`crate::quant_bytes`]: no memory lookup per value
//! (sixteen scalar loads per vector were the cost of the AVX-512 path).
//!
//! Quantising packs bytes of the 64 values' bits into one register with
//! `vpmultishiftqb` (any 8-bit window, at a per-value bit offset), which
//! leaves value `16k + i` (register `k`, lane `i`) at byte `4i + k`; the
//! codes are put back in order by one `vpermb`.
//!
//! Only called with [`super::x86::Avx512Vbmi`]'s features enabled.

use crate::quant::Codebook;
use crate::quant_bytes::{CONSTANT, LOW_EXPONENT, TOP_BINADE};
use std::arch::x86_64::*;

/// A 64-byte run of a table in a register.
#[inline(always)]
unsafe fn load64(bytes: &[u8]) -> __m512i {
    assert!(bytes.len() >= 64);
    // SAFETY: 64 readable bytes (checked).
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

/// A 256-byte table in four registers.
#[inline(always)]
unsafe fn load256(bytes: &[u8]) -> [__m512i; 4] {
    // SAFETY: `load64` checks the length. (No `array::map`: it may stay a
    // call, compiled without the features.)
    unsafe {
        [
            load64(bytes),
            load64(&bytes[64..]),
            load64(&bytes[128..]),
            load64(&bytes[192..]),
        ]
    }
}

/// The 8 bits from bit `offset` (per byte, counted in the value's qword) of
/// each value of `x`: value `16k + i` at byte `4i + k`.
#[inline(always)]
unsafe fn windows(x: &[__m512i; 4], offset: __m512i) -> __m512i {
    // SAFETY: register operations only (features: see the module note).
    unsafe {
        let lanes = 0x1111_1111_1111_1111u64;
        let bytes = _mm512_maskz_multishift_epi64_epi8(lanes, offset, x[0]);
        let bytes = _mm512_mask_multishift_epi64_epi8(bytes, lanes << 1, offset, x[1]);
        let bytes = _mm512_mask_multishift_epi64_epi8(bytes, lanes << 2, offset, x[2]);
        _mm512_mask_multishift_epi64_epi8(bytes, lanes << 3, offset, x[3])
    }
}

/// `table[index]` for 64 byte indices; `high` holds their bit 7.
#[inline(always)]
unsafe fn lookup256(table: &[__m512i; 4], index: __m512i, high: __mmask64) -> __m512i {
    // SAFETY: register operations only (features: see the module note).
    unsafe {
        let low_half = _mm512_permutex2var_epi8(table[0], index, table[1]);
        let high_half = _mm512_permutex2var_epi8(table[2], index, table[3]);
        _mm512_mask_blend_epi8(high, low_half, high_half)
    }
}

/// Byte order that makes the unpacks of [`dequantize`] give values in
/// order: position `16l + 4k + d` takes code `16k + 4l + d`.
const DEQUANTIZE_ORDER: [u8; 64] = {
    let mut order = [0u8; 64];
    let mut j = 0;
    while j < 64 {
        let (l, k, d) = (j / 16, (j / 4) % 4, j % 4);
        order[j] = (16 * k + 4 * l + d) as u8;
        j += 1;
    }
    order
};

/// Code `16k + i` sits at byte `4i + k` after [`quantize`]'s windows.
const QUANTIZE_ORDER: [u8; 64] = {
    let mut order = [0u8; 64];
    let mut j = 0;
    while j < 64 {
        order[j] = (4 * (j % 16) + j / 16) as u8;
        j += 1;
    }
    order
};

/// `out[i] = book.values[codes[i]] * scale` for `n` codes, `n` a multiple of 64.
///
/// # Safety
/// AVX-512 F/BW/VBMI are enabled; `codes` readable and `out` writable for `n` elements.
#[inline(always)]
pub(super) unsafe fn dequantize(
    codes: *const u8,
    n: usize,
    book: &Codebook,
    scale: f32,
    out: *mut f32,
) {
    // SAFETY: see the function's contract.
    unsafe {
        let p = &book.bytes.planes;
        let planes = [
            load256(&p[0]),
            load256(&p[1]),
            load256(&p[2]),
            load256(&p[3]),
        ];
        let order = load64(&DEQUANTIZE_ORDER);
        let scale = _mm512_set1_ps(scale);
        for i in (0..n).step_by(64) {
            let c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes.add(i).cast()));
            let high = _mm512_movepi8_mask(c);
            let b0 = lookup256(&planes[0], c, high);
            let b1 = lookup256(&planes[1], c, high);
            let b2 = lookup256(&planes[2], c, high);
            let b3 = lookup256(&planes[3], c, high);
            let (lo01, hi01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
            let (lo23, hi23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
            let values = [
                _mm512_unpacklo_epi16(lo01, lo23),
                _mm512_unpackhi_epi16(lo01, lo23),
                _mm512_unpacklo_epi16(hi01, hi23),
                _mm512_unpackhi_epi16(hi01, hi23),
            ];
            for (k, v) in values.iter().enumerate() {
                let v = _mm512_mul_ps(_mm512_castsi512_ps(*v), scale);
                _mm512_storeu_ps(out.add(i + 16 * k), v);
            }
        }
    }
}

/// `out[i] = book.quantize(src[i] * inv)` for `n` values, `n` a multiple of 64.
///
/// # Safety
/// AVX-512 F/BW/VBMI are enabled; `src` readable and `out` writable for `n` elements.
#[inline(always)]
pub(super) unsafe fn quantize(src: *const f32, n: usize, inv: f32, book: &Codebook, out: *mut u8) {
    // SAFETY: see the function's contract.
    unsafe {
        let t = &book.bytes;
        let window = [load64(&t.window), load64(&t.window[64..])];
        let region = [load64(&t.region), load64(&t.region[64..])];
        let below = [load256(&t.below), load256(&t.below[256..])];
        let split = [load256(&t.split), load256(&t.split[256..])];
        let order = load64(&QUANTIZE_ORDER);
        // Bit offsets are counted in a value's qword: odd lanes start at 32.
        let odd = _mm512_set1_epi64(0x2020_2020_0000_0000);
        let exponent_at = _mm512_add_epi8(odd, _mm512_set1_epi8(23));
        let top_at = _mm512_add_epi8(odd, _mm512_set1_epi8(24));
        let scale = _mm512_set1_ps(inv);
        for g in (0..n).step_by(64) {
            let mut x = [_mm512_setzero_si512(); 4];
            for (k, v) in x.iter_mut().enumerate() {
                *v =
                    _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(src.add(g + 16 * k)), scale));
            }
            let top = windows(&x, top_at); // sign, exponent bits 7..1
            let negative = _mm512_movepi8_mask(top);
            let binade = _mm512_min_epu8(
                _mm512_subs_epu8(
                    windows(&x, exponent_at),
                    _mm512_set1_epi8(LOW_EXPONENT as i8),
                ),
                _mm512_set1_epi8(TOP_BINADE as i8),
            );
            let binade = _mm512_mask_add_epi8(binade, negative, binade, _mm512_set1_epi8(64));
            let w = _mm512_permutex2var_epi8(window[0], binade, window[1]);
            let r = _mm512_permutex2var_epi8(region[0], binade, region[1]);
            let upper = _mm512_movepi8_mask(w);
            let constant = _mm512_test_epi8_mask(w, _mm512_set1_epi8(CONSTANT as i8));
            let offset = _mm512_add_epi8(w, odd); // the flags above bit 5 are ignored
            let slot = _mm512_add_epi8(windows(&x, offset), r);
            let high = _mm512_movepi8_mask(slot);
            let code = _mm512_mask_blend_epi8(
                upper,
                lookup256(&below[0], slot, high),
                lookup256(&below[1], slot, high),
            );
            let split = _mm512_mask_blend_epi8(
                upper,
                lookup256(&split[0], slot, high),
                lookup256(&split[1], slot, high),
            );
            // The 7 bits under the window, complemented when negative (as the split bytes).
            let under = windows(&x, _mm512_sub_epi8(offset, _mm512_set1_epi8(7)));
            let seven = _mm512_set1_epi8(0x7f);
            let flip = _mm512_maskz_mov_epi8(negative, seven);
            let under = _mm512_ternarylogic_epi32::<0x6c>(under, flip, seven); // (under & 7f) ^ flip
            let above = _mm512_cmpgt_epu8_mask(under, split);
            let code = _mm512_mask_add_epi8(code, above, code, _mm512_set1_epi8(1));
            let code = _mm512_mask_mov_epi8(code, constant, r);
            _mm512_storeu_si512(out.add(g).cast(), _mm512_permutexvar_epi8(order, code));
            let deferred = constant & upper;
            let tied = (_mm512_cmpeq_epu8_mask(under, split) & !constant) | deferred;
            if tied != 0 {
                decide_ties(tied, src.add(g), inv, book, out.add(g));
            }
        }
    }
}

/// The scalar reference for values whose bits under the window equal their
/// midpoint's (byte `4i + k` of `tied` is value `16k + i`).
#[cold]
#[inline(never)]
unsafe fn decide_ties(mut tied: u64, src: *const f32, inv: f32, book: &Codebook, out: *mut u8) {
    while tied != 0 {
        let at = tied.trailing_zeros() as usize;
        let value = 16 * (at % 4) + at / 4;
        // SAFETY: value < 64, within the caller's run.
        unsafe { *out.add(value) = book.quantize(*src.add(value) * inv) };
        tied &= tied - 1;
    }
}
