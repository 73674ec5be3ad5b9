//! SGD with an 8-bit block-wise momentum buffer: the same bits on every SIMD
//! path and thread count (every length 0..=67, block tails, odd offsets,
//! float32 and bfloat16 weights), a float64 reference of "dequantise → SGD →
//! quantise", the first step's buffer taken from the gradient, and refusals
//! before anything is written.

use half::bf16;
use oxoptim_core::kernels::sgd8bit::Sgd8bitConfig;
use oxoptim_core::optimizer::{find, HyperValue};
use oxoptim_core::quant::{self, Codebook, Map, BLOCK};
use oxoptim_core::rounding::ParamRounding;
use oxoptim_core::{Backend, DType, Error, Exec, SgdConfig, OPTIMIZERS};

mod common;
use common::{raw, reference_codes, same_on_every_path, step_table_row, values, Storage, OFFSETS};

fn lengths() -> Vec<usize> {
    (0..=67).chain([255, 256, 257, 511, 513, 1000]).collect()
}

/// Parameters (of storage type `T`), float32 gradients' values in `T`, and the 8-bit buffer,
/// each parameter-shaped array laid out `offset` elements in.
struct Slots<T> {
    p: Vec<Vec<T>>,
    g: Vec<Vec<T>>,
    codes: Vec<Vec<u8>>,
    absmax: Vec<Vec<f32>>,
    step: Vec<f32>,
    offset: usize,
}

impl<T: Storage> Slots<T> {
    /// `warm`: start from a quantised non-trivial buffer at step 1, else fresh (step 0).
    fn new(lens: &[usize], offset: usize, warm: bool) -> Slots<T> {
        let mut s = Slots {
            p: vec![],
            g: vec![],
            codes: vec![],
            absmax: vec![],
            step: vec![if warm { 1.0 } else { 0.0 }; lens.len()],
            offset,
        };
        for (i, &n) in lens.iter().enumerate() {
            let vals = |k: u64| values(i as u64 * 10 + k, n + offset);
            s.p.push(vals(1).into_iter().map(T::from_f64).collect());
            s.g.push(vals(2).into_iter().map(|x| T::from_f64(x * 1e-2)).collect());
            let buf: Vec<f32> = vals(3).into_iter().map(|x| x as f32 * 1e-2).collect();
            let mut codes = vec![0u8; n + offset];
            let mut absmax = vec![0f32; n.div_ceil(BLOCK)];
            if warm {
                quant::quantize_blockwise(
                    Map::Signed,
                    Backend::Scalar,
                    &buf[offset..],
                    &mut codes[offset..],
                    &mut absmax,
                );
            } else {
                let zero = Codebook::get(Map::Signed)
                    .values
                    .iter()
                    .position(|&v| v == 0.0);
                codes.fill(zero.unwrap() as u8);
            }
            s.codes.push(codes);
            s.absmax.push(absmax);
        }
        s
    }

    fn step(&mut self, config: &Sgd8bitConfig, exec: Exec) -> Result<(), Error> {
        let o = self.offset;
        let mut arrays = Vec::new();
        for i in 0..self.p.len() {
            let n = self.p[i].len() - o;
            arrays.push(raw(self.p[i][o..].as_mut_ptr() as usize, n, T::DTYPE));
            arrays.push(raw(self.g[i][o..].as_mut_ptr() as usize, n, T::DTYPE));
            arrays.push(raw(self.codes[i][o..].as_mut_ptr() as usize, n, DType::U8));
            let a = &mut self.absmax[i];
            arrays.push(raw(a.as_mut_ptr() as usize, a.len(), DType::F32));
        }
        let cells = (0..self.step.len())
            .map(|i| raw(&mut self.step[i] as *mut f32 as usize, 1, DType::F32))
            .collect();
        // SAFETY: the vectors outlive the call and nothing else touches them meanwhile.
        unsafe { step_table_row(config, arrays, cells, exec) }
    }

    fn bits(&self) -> Vec<Vec<u64>> {
        let p = self.p.iter().map(|x| x.iter().map(|y| y.bits()).collect());
        let c = self
            .codes
            .iter()
            .map(|x| x.iter().map(|&y| y as u64).collect());
        let a = self
            .absmax
            .iter()
            .map(|x| x.iter().map(|y| y.to_bits() as u64).collect());
        p.chain(c).chain(a).collect()
    }
}

fn config(dampening: f64, nesterov: bool, maximize: bool) -> Sgd8bitConfig {
    Sgd8bitConfig {
        sgd: SgdConfig {
            lr: 1e-2,
            momentum: 0.9,
            dampening,
            weight_decay: 0.01,
            nesterov,
            maximize,
        },
    }
}

fn configs() -> [Sgd8bitConfig; 3] {
    [
        config(0.0, false, false),
        config(0.0, true, false),
        config(0.25, false, true),
    ]
}

/// Three steps from a fresh and from a warm buffer give the same bits on every
/// backend and thread count as the scalar path on one thread.
fn same_everywhere<T: Storage>(rounding: ParamRounding) {
    // Every short length, block tails, and one slot long enough to be split across threads.
    let lens: Vec<usize> = lengths().into_iter().chain([70_001]).collect();
    for c in configs() {
        for warm in [false, true] {
            for offset in OFFSETS {
                let run = |exec: Exec| {
                    let mut s = Slots::<T>::new(&lens, offset, warm);
                    for _ in 0..3 {
                        s.step(&c, exec.with_rounding(rounding)).unwrap();
                    }
                    assert!(s.step.iter().all(|&k| k == if warm { 4.0 } else { 3.0 }));
                    s.bits()
                };
                same_on_every_path(&format!("{c:?} warm={warm} offset={offset}"), run);
            }
        }
    }
}

#[test]
fn sgd8bit_is_the_same_on_every_path_thread_count_length_and_offset() {
    same_everywhere::<f32>(ParamRounding::Nearest);
}

#[test]
fn sgd8bit_with_bf16_weights_is_the_same_on_every_path_and_thread_count() {
    same_everywhere::<bf16>(ParamRounding::Nearest);
    same_everywhere::<bf16>(ParamRounding::Stochastic { seed: 7, count: 3 });
}

#[test]
fn bf16_weights_rounded_to_nearest_are_the_f32_update_rounded() {
    let lens: Vec<usize> = (0..=67).chain([257, 1000]).collect();
    for c in configs() {
        let mut half = Slots::<bf16>::new(&lens, 0, true);
        let mut wide = Slots::<f32>::new(&lens, 0, true);
        wide.p = half
            .p
            .iter()
            .map(|p| p.iter().map(|x| x.to_f32()).collect())
            .collect();
        wide.g = half
            .g
            .iter()
            .map(|g| g.iter().map(|x| x.to_f32()).collect())
            .collect();
        half.step(&c, Exec::new(Backend::active(), 2)).unwrap();
        wide.step(&c, Exec::new(Backend::Scalar, 1)).unwrap();
        for (h, w) in half.p.iter().zip(&wide.p) {
            let want: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            assert_eq!(h, &want, "{c:?}");
        }
        assert_eq!(half.codes, wide.codes);
        assert_eq!(half.absmax, wide.absmax);
    }
}

#[test]
fn one_step_matches_a_float64_dequantise_sgd_quantise_reference() {
    let n = 4 * BLOCK + 77;
    for c in configs() {
        for warm in [false, true] {
            let mut s = Slots::<f32>::new(&[n], 0, warm);
            let (p0, g) = (s.p[0].clone(), s.g[0].clone());
            let book = Codebook::get(Map::Signed);
            let b0: Vec<f64> = (0..n)
                .map(|i| book.values[s.codes[0][i] as usize] as f64 * s.absmax[0][i / BLOCK] as f64)
                .collect();
            s.step(&c, Exec::new(Backend::active(), 1)).unwrap();
            let k = c.sgd;
            let sign = if k.maximize { -1.0 } else { 1.0 };
            let d: Vec<f64> = (0..n)
                .map(|i| sign * g[i] as f64 + k.weight_decay * p0[i] as f64)
                .collect();
            let b1: Vec<f64> = (0..n)
                .map(|i| {
                    if warm {
                        k.momentum * b0[i] + (1.0 - k.dampening) * d[i]
                    } else {
                        d[i]
                    }
                })
                .collect();
            let mut differing = 0;
            for b in 0..n.div_ceil(BLOCK) {
                let at = b * BLOCK..n.min((b + 1) * BLOCK);
                let (want, want_absmax) = reference_codes(Map::Signed, &b1[at.clone()]);
                let got_absmax = s.absmax[0][b] as f64;
                assert!(
                    (got_absmax - want_absmax).abs() <= 1e-6 * want_absmax,
                    "absmax of block {b}"
                );
                for (got, want) in s.codes[0][at].iter().zip(&want) {
                    // Only a value within rounding of a midpoint may land one code over.
                    assert!(got.abs_diff(*want) <= 1);
                    differing += usize::from(got != want);
                }
            }
            assert!(
                differing * 1000 <= n,
                "{c:?} warm={warm}: {differing} of {n} codes differ"
            );
            for i in 0..n {
                let dir = if k.nesterov {
                    d[i] + k.momentum * b1[i]
                } else {
                    b1[i]
                };
                let want = p0[i] as f64 - k.lr * dir;
                let got = s.p[0][i] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{c:?} param {i}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn bad_settings_and_batches_are_refused_before_anything_is_written() {
    let entry = find(OPTIMIZERS, "sgd8bit").unwrap();
    let hyper = |momentum: f64| -> Vec<(String, HyperValue)> {
        vec![
            ("lr".into(), HyperValue::Float(0.1)),
            ("momentum".into(), HyperValue::Float(momentum)),
            ("dampening".into(), HyperValue::Float(0.0)),
            ("weight_decay".into(), HyperValue::Float(0.0)),
            ("nesterov".into(), HyperValue::Flag(false)),
            ("maximize".into(), HyperValue::Flag(false)),
        ]
    };
    assert!(entry.configure(hyper(0.9)).is_ok());
    assert!(matches!(
        entry.configure(hyper(0.0)),
        Err(Error::InvalidArgument(_))
    ));

    let c = configs()[0];
    let mut s = Slots::<f32>::new(&[300, 40], 0, true);
    let before = s.bits();
    // An absmax array one short for its parameter.
    let last = s.absmax[0].pop().unwrap();
    let r = s.step(&c, Exec::default());
    assert!(matches!(r, Err(Error::Mismatch(_))), "{r:?}");
    s.absmax[0].push(last);
    // Kahan summation has no 8-bit form.
    let r = s.step(&c, Exec::default().with_rounding(ParamRounding::Kahan));
    assert!(r.is_err(), "{r:?}");
    assert_eq!(s.step, [1.0, 1.0]);
    assert_eq!(s.bits(), before);
}
