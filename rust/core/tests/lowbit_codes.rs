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
