//! Adafactor, whose factored state is not shaped like the parameter: each
//! SIMD backend gives results bit-identical to the scalar reference for every
//! vector length and every row and column length 1..=67, misaligned starts,
//! all dtypes and any thread count; bad layouts are refused before anything
//! is written.

use half::{bf16, f16};
use oxoptim_core::kernels::adafactor::Matrix;
use oxoptim_core::optimizer::{find, Entry};
use oxoptim_core::{
    Backend, Configured, DisjointMemo, Error, Exec, HyperValue, RawTensor, ScalarState,
    TensorBatch, OPTIMIZERS,
};

mod common;
use common::{values, Storage, OFFSETS};

use HyperValue::{Flag, Float};

/// One setting: `(lr, eps1, d, weight_decay, maximize)`, reaching the
/// relative step size, the eps1 clamps, update clipping and the decay.
const SETTINGS: [(f64, f64, f64, f64, bool); 4] = [
    (0.01, 1e-30, 1.0, 0.0, false),
    (0.1, 1e-3, 2.0, 0.1, true),
    (0.1, 0.5, 1.0, 0.0, false),
    (1.0, 1e-30, 100.0, 0.01, false),
];

fn configure(setting: (f64, f64, f64, f64, bool), factored: bool) -> (Entry, Box<dyn Configured>) {
    let (lr, eps1, d, wd, maximize) = setting;
    let entry = find(OPTIMIZERS, "adafactor").unwrap();
    let hyper = [
        ("lr", Float(lr)),
        ("beta2_decay", Float(-0.8)),
        ("eps1", Float(eps1)),
        ("eps2", Float(1e-3)),
        ("d", Float(d)),
        ("weight_decay", Float(wd)),
        ("maximize", Flag(maximize)),
        ("factored", Flag(factored)),
    ];
    let configured = entry
        .configure(hyper.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        .unwrap();
    (entry, configured)
}

/// The arrays of every slot (`[param, grad, state...]`), each in its own
/// buffer starting `offset` elements in; state starts non-negative.
struct Slots<T> {
    buffers: Vec<Vec<T>>,
    lens: Vec<usize>,
    arity: usize,
    offset: usize,
}

impl<T: Storage> Slots<T> {
    /// One slot per shape: a vector of `n` elements (`batch == 0`), else a
    /// `batch × rows × cols` matrix with its two factors.
    fn new(shapes: &[Matrix], factored: bool, offset: usize) -> Self {
        let arity = if factored { 4 } else { 3 };
        let mut buffers = Vec::new();
        let mut lens = Vec::new();
        for (t, s) in shapes.iter().enumerate() {
            let n = s.batch * s.rows * s.cols;
            let state: Vec<usize> = if factored {
                vec![s.batch * s.rows, s.batch * s.cols]
            } else {
                vec![n]
            };
            for (k, len) in [n, n].into_iter().chain(state).enumerate() {
                let vals = values((t * 31 + k) as u64 ^ 7, len + offset);
                buffers.push(
                    vals.into_iter()
                        .map(|v| T::from_f64(if k >= 2 { v.abs() } else { v }))
                        .collect(),
                );
                lens.push(len);
            }
        }
        Slots {
            buffers,
            lens,
            arity,
            offset,
        }
    }

    fn batch(&mut self, configured: &dyn Configured) -> Result<TensorBatch, Error> {
        let raws = self
            .buffers
            .iter_mut()
            .zip(&self.lens)
            .map(|(b, &len)| RawTensor {
                addr: b[self.offset..].as_mut_ptr() as usize,
                len,
                dtype: T::DTYPE,
            })
            .collect();
        // SAFETY: the buffers outlive the batch and are not touched meanwhile.
        unsafe {
            TensorBatch::with_specs(
                raws,
                &configured.array_specs(),
                &mut DisjointMemo::default(),
            )
        }
    }

    fn bits(&self) -> Vec<Vec<u64>> {
        self.buffers
            .iter()
            .map(|b| b.iter().map(|x| x.bits()).collect())
            .collect()
    }
}

/// One step of `batch` with `steps` (float64) as the step counters.
fn step(
    entry: &Entry,
    configured: &dyn Configured,
    batch: &TensorBatch,
    steps: &mut [f64],
    exec: Exec,
) -> Result<(), Error> {
    let cells = steps
        .iter_mut()
        .map(|c| RawTensor {
            addr: c as *mut f64 as usize,
            len: 1,
            dtype: oxoptim_core::DType::F64,
        })
        .collect();
    // SAFETY: the cells outlive the state and nothing else touches them meanwhile.
    let mut scalars = unsafe { ScalarState::new(cells, 1, batch) }.unwrap();
    entry.step(configured, batch, &mut scalars, exec)
}

/// Three steps from step 0 on `exec`: every array's bits, and the step counters.
fn three_steps<T: Storage>(
    shapes: &[Matrix],
    factored: bool,
    setting: (f64, f64, f64, f64, bool),
    offset: usize,
    exec: Exec,
) -> (Vec<Vec<u64>>, Vec<f64>) {
    let (entry, configured) = configure(setting, factored);
    let mut slots = Slots::<T>::new(shapes, factored, offset);
    let mut steps = vec![0.0f64; shapes.len()];
    let batch = slots.batch(configured.as_ref()).unwrap();
    assert_eq!(batch.arity(), slots.arity);
    for _ in 0..3 {
        step(&entry, configured.as_ref(), &batch, &mut steps, exec).unwrap();
    }
    drop(batch);
    (slots.bits(), steps)
}

fn vector(n: usize) -> Matrix {
    Matrix {
        batch: 1,
        rows: 1,
        cols: n,
    }
}

fn check<T: Storage>(shapes: &[Matrix], factored: bool, threads: &[usize]) {
    for setting in SETTINGS {
        for offset in OFFSETS {
            let reference = three_steps::<T>(
                shapes,
                factored,
                setting,
                offset,
                Exec::new(Backend::Scalar, 1),
            );
            assert_eq!(reference.1, vec![3.0; shapes.len()]);
            for backend in Backend::supported() {
                for &t in threads {
                    let got =
                        three_steps::<T>(shapes, factored, setting, offset, Exec::new(backend, t));
                    assert!(
                        got == reference,
                        "{backend:?} threads={t} offset={offset} {setting:?} factored={factored} {:?}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

fn every_tail<T: Storage>() {
    let vectors: Vec<Matrix> = (1..=67).map(vector).collect();
    check::<T>(&vectors, false, &[1]);
    // Every row length (the SIMD tail along a row), and every row count.
    let wide: Vec<Matrix> = (1..=67)
        .map(|cols| Matrix {
            batch: 2,
            rows: 3,
            cols,
        })
        .collect();
    check::<T>(&wide, true, &[1]);
    let tall: Vec<Matrix> = (1..=67)
        .map(|rows| Matrix {
            batch: 1,
            rows,
            cols: 5,
        })
        .collect();
    check::<T>(&tall, true, &[1]);
}

#[test]
fn simd_matches_scalar_for_every_tail_f32() {
    every_tail::<f32>();
}

#[test]
fn simd_matches_scalar_for_every_tail_f64() {
    every_tail::<f64>();
}

#[test]
fn simd_matches_scalar_for_every_tail_half() {
    every_tail::<bf16>();
    every_tail::<f16>();
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let matrices = [
        Matrix {
            batch: 1,
            rows: 301,
            cols: 257,
        },
        Matrix {
            batch: 3,
            rows: 17,
            cols: 1001,
        },
        Matrix {
            batch: 1,
            rows: 2,
            cols: 3,
        },
    ];
    check::<f32>(&matrices, true, &[1, 2, 3, 7]);
    check::<f32>(
        &[vector(200_003), vector(5), vector(70_001)],
        false,
        &[1, 2, 3, 7],
    );
}

#[test]
fn the_factors_lengths_decide_the_shape() {
    assert_eq!(Matrix::from_lens(15, 3, 5), Some(m(1, 3, 5)));
    assert_eq!(Matrix::from_lens(120, 24, 30), Some(m(6, 4, 5)));
    assert_eq!(Matrix::from_lens(7, 7, 1), Some(m(1, 7, 1)));
    assert_eq!(Matrix::from_lens(15, 4, 5), None);
    assert_eq!(Matrix::from_lens(12, 3, 5), None);
    assert_eq!(Matrix::from_lens(0, 3, 5), None);
    assert_eq!(Matrix::from_lens(6, 6, 6), Some(m(6, 1, 1)));
}

#[test]
fn bad_layouts_are_refused_before_anything_is_written() {
    // Factors that divide the parameter but are not the factors of any shape.
    let mut slots = Slots::<f32>::new(&[m(1, 3, 5)], true, 0);
    slots.lens[2] = 5;
    slots.lens[3] = 5;
    let err = refused_step(true, &mut slots);
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    // A factor that does not divide the parameter: refused by the batch itself.
    slots.lens[2] = 4;
    let (_, configured) = configure(SETTINGS[1], true);
    assert!(matches!(
        slots.batch(configured.as_ref()),
        Err(Error::Mismatch(_))
    ));
    // An empty parameter (torch cannot step it): left to torch.
    let mut slots = Slots::<f32>::new(&[vector(3), vector(0)], false, 0);
    let err = refused_step(false, &mut slots);
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}

/// The error a step of `slots` gives, after checking that it wrote nothing.
fn refused_step(factored: bool, slots: &mut Slots<f32>) -> Error {
    let (entry, configured) = configure(SETTINGS[1], factored);
    let before = slots.bits();
    let batch = slots.batch(configured.as_ref()).unwrap();
    let mut steps = vec![0.0f64; batch.slots()];
    let err = step(
        &entry,
        configured.as_ref(),
        &batch,
        &mut steps,
        Exec::default(),
    )
    .unwrap_err();
    drop(batch);
    assert!(steps.iter().all(|&s| s == 0.0), "{steps:?}");
    assert_eq!(slots.bits(), before);
    err
}

fn m(batch: usize, rows: usize, cols: usize) -> Matrix {
    Matrix { batch, rows, cols }
}
