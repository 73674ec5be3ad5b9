//! The 8-bit coders of every path against the scalar reference
//! (`Codebook::quantize` / `dequantize`), value by value: every f32 bit
//! pattern, special values in blocks of every length, every code.

use oxoptim_core::quant::{self, Codebook, Map, BLOCK};
use oxoptim_core::Backend;
use rayon::prelude::*;

fn vector_paths() -> Vec<Backend> {
    Backend::supported()
        .into_iter()
        .filter(|&b| b != Backend::Scalar)
        .collect()
}

#[test]
fn every_f32_bit_pattern_gets_the_reference_code_on_every_path() {
    const CHUNK: u64 = 1 << 20;
    let paths = vector_paths();
    for map in [Map::Signed, Map::Unsigned] {
        let book = Codebook::get(map);
        let bad: Vec<String> = (0..(1u64 << 32) / CHUNK)
            .into_par_iter()
            .filter_map(|chunk| {
                // Offset by 5 so that runs, vectors and the scalar tail all see every pattern.
                let values: Vec<f32> = (0..CHUNK + 5)
                    .map(|i| f32::from_bits((chunk * CHUNK + i) as u32))
                    .collect();
                let want: Vec<u8> = values.iter().map(|&x| book.quantize(x * 1.0)).collect();
                let mut got = vec![0u8; values.len()];
                paths.iter().find_map(|&backend| {
                    quant::quantize_scaled(map, backend, &values, 1.0, &mut got);
                    let i = (0..got.len()).find(|&i| got[i] != want[i])?;
                    Some(format!(
                        "{map:?} {backend:?} {:#010x}: {} instead of {}",
                        values[i].to_bits(),
                        got[i],
                        want[i]
                    ))
                })
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{} chunks differ, e.g. {}",
            bad.len(),
            bad[0]
        );
    }
}

/// Values at and around every midpoint and entry, and the special ones.
fn awkward(book: &Codebook) -> Vec<f32> {
    let mut out = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::MAX,
        f32::MIN,
    ];
    for &m in book.midpoints().iter().chain(&book.values) {
        for d in 0..3u32 {
            out.extend([m.to_bits() + d, m.to_bits().wrapping_sub(d)].map(f32::from_bits));
        }
    }
    out
}

#[test]
fn awkward_values_in_blocks_of_every_length_and_scale() {
    for map in [Map::Signed, Map::Unsigned] {
        let book = Codebook::get(map);
        let all = awkward(book);
        for n in (0..=67).chain([255, 256, 257, 1000]) {
            for offset in [0, 1, 3] {
                let values: Vec<f32> = all
                    .iter()
                    .cycle()
                    .skip(offset * 7)
                    .take(n)
                    .copied()
                    .collect();
                for inv in [1.0, 0.5, 3.0, 0.0, f32::INFINITY, f32::NAN] {
                    let want: Vec<u8> = values.iter().map(|&x| book.quantize(x * inv)).collect();
                    for backend in vector_paths() {
                        let mut got = vec![0u8; n];
                        quant::quantize_scaled(map, backend, &values, inv, &mut got);
                        assert_eq!(got, want, "{map:?} {backend:?} n={n} inv={inv}");
                    }
                }
                // And whole blocks, absmax included: with NaN and inf (whose
                // blocks code alike), and finite only.
                let finite: Vec<f32> = all
                    .iter()
                    .filter(|x| x.is_finite())
                    .cycle()
                    .skip(offset * 7)
                    .take(n)
                    .copied()
                    .collect();
                for values in [&values, &finite] {
                    let run = |backend| {
                        let mut codes = vec![0u8; n];
                        let mut amax = vec![0f32; n.div_ceil(BLOCK)];
                        quant::quantize_blockwise(map, backend, values, &mut codes, &mut amax);
                        (codes, amax.iter().map(|a| a.to_bits()).collect::<Vec<_>>())
                    };
                    let reference = run(Backend::Scalar);
                    for backend in vector_paths() {
                        assert_eq!(run(backend), reference, "{map:?} {backend:?} n={n}");
                    }
                }
            }
        }
    }
}

#[test]
fn every_code_dequantizes_to_the_reference_value() {
    for map in [Map::Signed, Map::Unsigned] {
        let book = Codebook::get(map);
        // Every code in every position of a 64-value run, then a tail.
        let codes: Vec<u8> = (0..256 * 64 + 37)
            .map(|i| (i * 5 + i / 256) as u8)
            .collect();
        for absmax in [1.0, 0.37, 3e-30, 0.0, f32::INFINITY, f32::NAN] {
            let blocks = codes.len().div_ceil(BLOCK);
            let want: Vec<u32> = codes
                .iter()
                .map(|&c| book.dequantize(c, absmax).to_bits())
                .collect();
            for backend in vector_paths() {
                let mut out = vec![0f32; codes.len()];
                quant::dequantize_blockwise(map, backend, &codes, &vec![absmax; blocks], &mut out);
                let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                assert!(got == want, "{map:?} {backend:?} absmax={absmax}");
            }
        }
    }
}

/// `(codes, absmax bits, dequantised bits)` of `values` on `backend`.
fn code_blocks(map: Map, backend: Backend, values: &[f32]) -> (Vec<u8>, Vec<u32>, Vec<u32>) {
    let n = values.len();
    let mut codes = vec![0u8; n];
    let mut amax = vec![0f32; n.div_ceil(BLOCK)];
    quant::quantize_blockwise(map, backend, values, &mut codes, &mut amax);
    let mut back = vec![0f32; n];
    quant::dequantize_blockwise(map, backend, &codes, &amax, &mut back);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (codes, bits(&amax), bits(&back))
}

/// Values of at most 13 significant bits in [-1, 1] (non-negative for the
/// unsigned map), none below 2^-12 in magnitude but zeros: exact when scaled
/// by down to 2^-137.
fn coarse(map: Map, n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let k = (s >> 40) as i64 % 4097; // 0..=4096
            let k = if i % 5 == 0 { 0 } else { k }; // exact zeros too
            let k = if map == Map::Signed && s & 1 == 1 {
                -k
            } else {
                k
            };
            k as f32 / 4096.0
        })
        .collect()
}

#[test]
fn subnormal_absmax_blocks_code_as_their_normal_scaled_copies_on_every_path() {
    // 1 / absmax overflows to inf below absmax ~2^-128; a block's codes must
    // not depend on its scale (those of bitsandbytes' x * (1 / absmax) for
    // the block scaled into the normal range).
    for map in [Map::Signed, Map::Unsigned] {
        for n in (0..=67).chain([255, 256, 257, 1000]) {
            for seed in 0..3 {
                let x = coarse(map, n, seed * 1000 + n as u64);
                let (want, want_amax, _) = code_blocks(map, Backend::Scalar, &x);
                for exp in [100, 126, 127, 128, 129, 135, 137] {
                    let scale = 2f64.powi(-exp) as f32; // (2f32.powi(-128) is 1 / inf = 0)
                    assert!(scale > 0.0);
                    let y: Vec<f32> = x.iter().map(|&v| v * scale).collect();
                    assert!(x
                        .iter()
                        .zip(&y)
                        .all(|(&a, &b)| (a as f64) * (scale as f64) == b as f64));
                    let reference = code_blocks(map, Backend::Scalar, &y);
                    assert_eq!(reference.0, want, "{map:?} n={n} seed={seed} 2^-{exp}");
                    let amax: Vec<u32> = want_amax
                        .iter()
                        .map(|&a| (f32::from_bits(a) * scale).to_bits())
                        .collect();
                    assert_eq!(reference.1, amax, "{map:?} n={n} 2^-{exp}");
                    // Zeros come back as zeros, and nothing is NaN.
                    for (&v, &b) in y.iter().zip(&reference.2) {
                        let b = f32::from_bits(b);
                        assert!(
                            !b.is_nan() && (v != 0.0 || b == 0.0),
                            "{map:?} n={n} 2^-{exp}"
                        );
                    }
                    for backend in vector_paths() {
                        assert_eq!(
                            code_blocks(map, backend, &y),
                            reference,
                            "{map:?} {backend:?} n={n} seed={seed} 2^-{exp}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn infinite_absmax_blocks_keep_their_finite_values_finite_on_every_path() {
    // An infinite element codes as ±1 (back: ±inf), every finite one as 0
    // (back: 0, not 0 · inf = NaN): as fp32 Adam, whose overflowed second
    // moment gives that element an update of m / inf = 0, and no NaN.
    for map in [Map::Signed, Map::Unsigned] {
        let book = Codebook::get(map);
        for n in (1..=67).chain([255, 256, 257, 1000]) {
            for (seed, infs) in [(0u64, 1usize), (1, 3), (2, n)] {
                let mut x = coarse(map, n, seed * 7919 + n as u64);
                for k in 0..infs.min(n) {
                    let i = (k * 37 + seed as usize) % n;
                    x[i] = if map == Map::Signed && k % 2 == 1 {
                        f32::NEG_INFINITY
                    } else {
                        f32::INFINITY
                    };
                }
                let reference = code_blocks(map, Backend::Scalar, &x);
                let (codes, amax, back) = &reference;
                for (b, chunk) in x.chunks(BLOCK).enumerate() {
                    let has_inf = chunk.iter().any(|v| v.is_infinite());
                    assert_eq!(f32::from_bits(amax[b]).is_infinite(), has_inf);
                }
                for (i, &v) in x.iter().enumerate() {
                    let a = f32::from_bits(amax[i / BLOCK]);
                    let back = f32::from_bits(back[i]);
                    assert!(!back.is_nan(), "{map:?} n={n} i={i}: NaN");
                    if a.is_infinite() {
                        let want = book.quantize(if v.is_infinite() { v.signum() } else { 0.0 });
                        assert_eq!(codes[i], want, "{map:?} n={n} i={i}");
                        let want_back = if v.is_infinite() { v } else { 0.0 };
                        assert_eq!(back, want_back, "{map:?} n={n} i={i}");
                    }
                }
                for backend in vector_paths() {
                    assert_eq!(
                        code_blocks(map, backend, &x),
                        reference,
                        "{map:?} {backend:?} n={n}"
                    );
                }
            }
        }
    }
}
