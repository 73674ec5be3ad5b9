//! 8-bit block-wise state: quantisation and the Adam8bit step give the same
//! bits on every SIMD path and thread count (every length 0..=67, block
//! tails, odd offsets), match a float64 reference of "dequantise → Adam →
//! quantise", and refuse bad batches before writing anything.

use oxoptim_core::kernels::adam8bit::Adam8bitConfig;
use oxoptim_core::optimizer::find;
use oxoptim_core::quant::{self, Codebook, Map, BLOCK};
use oxoptim_core::{
    AdamConfig, Backend, DType, Error, Exec, RawTensor, ScalarState, TensorBatch, OPTIMIZERS,
};

mod common;
use common::{raw, reference_codes, same_on_every_path, step_table_row, values, OFFSETS};

fn lengths() -> Vec<usize> {
    (0..=67).chain([255, 256, 257, 511, 513, 1000]).collect()
}

#[test]
fn quantisation_is_the_same_on_every_path_for_every_length_and_offset() {
    for map in [Map::Signed, Map::Unsigned] {
        for n in lengths() {
            for offset in OFFSETS {
                let x: Vec<f32> = values(n as u64, n + offset)
                    .into_iter()
                    .map(|v| {
                        if map == Map::Unsigned {
                            v.abs() as f32
                        } else {
                            v as f32
                        }
                    })
                    .collect();
                let run = |backend| {
                    let mut codes = vec![0u8; n + offset];
                    let mut amax = vec![0f32; n.div_ceil(BLOCK)];
                    quant::quantize_blockwise(
                        map,
                        backend,
                        &x[offset..],
                        &mut codes[offset..],
                        &mut amax,
                    );
                    let mut back = vec![0f32; n + offset];
                    quant::dequantize_blockwise(
                        map,
                        backend,
                        &codes[offset..],
                        &amax,
                        &mut back[offset..],
                    );
                    (
                        codes,
                        amax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        back.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                    )
                };
                let reference = run(Backend::Scalar);
                for backend in Backend::supported() {
                    assert_eq!(
                        run(backend),
                        reference,
                        "{map:?} n={n} offset={offset} {backend:?}"
                    );
                }
            }
        }
    }
}

/// Parameters, gradients and 8-bit state for `lens`, laid out `offset` elements in.
struct Slots {
    p: Vec<Vec<f32>>,
    g: Vec<Vec<f32>>,
    m: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    ma: Vec<Vec<f32>>,
    va: Vec<Vec<f32>>,
    step: Vec<f32>,
    offset: usize,
}

impl Slots {
    fn new(lens: &[usize], offset: usize) -> Slots {
        let mut s = Slots {
            p: vec![],
            g: vec![],
            m: vec![],
            v: vec![],
            ma: vec![],
            va: vec![],
            step: vec![0.0; lens.len()],
            offset,
        };
        for (i, &n) in lens.iter().enumerate() {
            let vals = |k: u64| values(i as u64 * 10 + k, n + offset);
            s.p.push(vals(1).into_iter().map(|x| x as f32).collect());
            s.g.push(vals(2).into_iter().map(|x| x as f32 * 1e-2).collect());
            // Start from quantised non-trivial moments.
            let m: Vec<f32> = vals(3).into_iter().map(|x| x as f32 * 1e-3).collect();
            let v: Vec<f32> = vals(4).into_iter().map(|x| (x * x) as f32 * 1e-5).collect();
            let (mut mc, mut vc) = (vec![0u8; n + offset], vec![0u8; n + offset]);
            let (mut ma, mut va) = (vec![0f32; n.div_ceil(BLOCK)], vec![0f32; n.div_ceil(BLOCK)]);
            quant::quantize_blockwise(
                Map::Signed,
                Backend::Scalar,
                &m[offset..],
                &mut mc[offset..],
                &mut ma,
            );
            quant::quantize_blockwise(
                Map::Unsigned,
                Backend::Scalar,
                &v[offset..],
                &mut vc[offset..],
                &mut va,
            );
            s.m.push(mc);
            s.v.push(vc);
            s.ma.push(ma);
            s.va.push(va);
        }
        s
    }

    fn step(&mut self, config: &Adam8bitConfig, exec: Exec) -> Result<(), Error> {
        let o = self.offset;
        let mut arrays = Vec::new();
        for i in 0..self.p.len() {
            let n = self.p[i].len() - o;
            arrays.push(raw(self.p[i][o..].as_mut_ptr() as usize, n, DType::F32));
            arrays.push(raw(self.g[i][o..].as_mut_ptr() as usize, n, DType::F32));
            arrays.push(raw(self.m[i][o..].as_mut_ptr() as usize, n, DType::U8));
            arrays.push(raw(self.v[i][o..].as_mut_ptr() as usize, n, DType::U8));
            for a in [&mut self.ma[i], &mut self.va[i]] {
                arrays.push(raw(a.as_mut_ptr() as usize, a.len(), DType::F32));
            }
        }
        let cells = (0..self.step.len())
            .map(|i| raw(&mut self.step[i] as *mut f32 as usize, 1, DType::F32))
            .collect();
        // SAFETY: the vectors outlive the call and nothing else touches them meanwhile.
        unsafe { step_table_row(config, arrays, cells, exec) }
    }

    fn bits(&self) -> Vec<Vec<u32>> {
        let f = |v: &Vec<Vec<f32>>| {
            v.iter()
                .map(|x| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        let u = |v: &Vec<Vec<u8>>| {
            v.iter()
                .map(|x| x.iter().map(|&y| y as u32).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        [f(&self.p), u(&self.m), u(&self.v), f(&self.ma), f(&self.va)].concat()
    }
}

fn config(decoupled: bool) -> Adam8bitConfig {
    Adam8bitConfig {
        adam: AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: decoupled,
        },
    }
}

#[test]
fn adam8bit_is_the_same_on_every_path_thread_count_length_and_offset() {
    // Every short length, block tails, and one slot long enough to be split across threads.
    let lens: Vec<usize> = lengths().into_iter().chain([70_001]).collect();
    for decoupled in [false, true] {
        let c = config(decoupled);
        for offset in OFFSETS {
            let run = |exec: Exec| {
                let mut s = Slots::new(&lens, offset);
                for _ in 0..3 {
                    s.step(&c, exec).unwrap();
                }
                assert!(s.step.iter().all(|&k| k == 3.0));
                s.bits()
            };
            same_on_every_path(&format!("offset={offset}"), run);
        }
    }
}

#[test]
fn one_step_matches_a_float64_dequantise_adam_quantise_reference() {
    let n = 4 * BLOCK + 77;
    let mut s = Slots::new(&[n], 0);
    let (p0, g) = (s.p[0].clone(), s.g[0].clone());
    let (sm, sv) = (Codebook::get(Map::Signed), Codebook::get(Map::Unsigned));
    let m0: Vec<f64> = (0..n)
        .map(|i| sm.values[s.m[0][i] as usize] as f64 * s.ma[0][i / BLOCK] as f64)
        .collect();
    let v0: Vec<f64> = (0..n)
        .map(|i| sv.values[s.v[0][i] as usize] as f64 * s.va[0][i / BLOCK] as f64)
        .collect();
    let c = config(true).adam;
    s.step(&config(true), Exec::new(Backend::active(), 1))
        .unwrap();
    let (bc1, bc2) = (1.0 - c.beta1, 1.0 - c.beta2);
    let m1: Vec<f64> = (0..n)
        .map(|i| c.beta1 * m0[i] + (1.0 - c.beta1) * g[i] as f64)
        .collect();
    let v1: Vec<f64> = (0..n)
        .map(|i| c.beta2 * v0[i] + (1.0 - c.beta2) * (g[i] as f64).powi(2))
        .collect();
    let mut differing = 0;
    for b in 0..n.div_ceil(BLOCK) {
        let at = b * BLOCK..n.min((b + 1) * BLOCK);
        for (map, x, codes, amax) in [
            (Map::Signed, &m1, &s.m[0], &s.ma[0]),
            (Map::Unsigned, &v1, &s.v[0], &s.va[0]),
        ] {
            let (want, want_absmax) = reference_codes(map, &x[at.clone()]);
            assert!(
                ((amax[b] as f64) - want_absmax).abs() <= 1e-6 * want_absmax,
                "absmax of block {b}"
            );
            for (got, want) in codes[at.clone()].iter().zip(&want) {
                // Only a value within rounding of a midpoint may land one code over.
                assert!(got.abs_diff(*want) <= 1);
                differing += usize::from(got != want);
            }
        }
    }
    // f32 vs f64 arithmetic moves a value across a midpoint only when it lies
    // within a few ulps of it: expected well under one in a thousand.
    assert!(
        differing * 1000 <= 2 * n,
        "{differing} of {} codes differ",
        2 * n
    );
    for i in 0..n {
        let denom = (v1[i].sqrt() / bc2.sqrt()) + c.eps;
        let want = p0[i] as f64 * (1.0 - c.lr * c.weight_decay) - c.lr / bc1 * m1[i] / denom;
        assert!(
            (s.p[0][i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "param {i}: {} vs {want}",
            s.p[0][i]
        );
    }
}

#[test]
fn bad_batches_are_refused_before_anything_is_written() {
    let c = config(true);
    let mut s = Slots::new(&[300, 40], 0);
    let before = s.bits();
    // An absmax array one short for its parameter.
    let last = s.ma[1].pop().unwrap();
    let r = s.step(&c, Exec::default());
    assert!(matches!(r, Err(Error::Mismatch(_))), "{r:?}");
    s.ma[1].push(last);
    assert_eq!(s.step, [0.0, 0.0]);
    assert_eq!(s.bits(), before);
    // A batch built with parameter-shaped specs does not reach the 8-bit kernel.
    let mut p = vec![0f32; 4];
    let raw = RawTensor {
        addr: p.as_mut_ptr() as usize,
        len: 4,
        dtype: DType::F32,
    };
    // SAFETY: `p` outlives the batch.
    let batch = unsafe { TensorBatch::new(vec![raw], 1) }.unwrap();
    let entry = find(OPTIMIZERS, "adam8bit").unwrap();
    let mut step = 0f32;
    let cell = RawTensor {
        addr: &mut step as *mut f32 as usize,
        len: 1,
        dtype: DType::F32,
    };
    // SAFETY: as above.
    let mut scalars = unsafe { ScalarState::new(vec![cell], 1, &batch) }.unwrap();
    assert!(entry
        .step(&c, &batch, &mut scalars, Exec::default())
        .is_err());
    assert_eq!(step, 0.0);
}
