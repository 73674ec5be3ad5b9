//! The subgradient, averaging, stream-probe and reduction kernels: every SIMD backend is
//! bit-identical to the scalar reference for lengths 0..=67, misaligned
//! starts and every dtype; reductions do not depend on the thread count.

use half::{bf16, f16};
use oxoptim_core::{
    accumulate_mean, any_nonfinite, lerp_average, norm, reduce, scale_into, stream_probe,
    subgradient_step, torch_norm, Backend, DType, Exec, RawTensor, Reduction, SubgradientConfig,
    TensorBatch,
};

mod common;
use common::{check_all_backends, values, Arrays, Storage, OFFSETS};

/// A reduction gives the same bits on every backend and thread count.
fn check_reduction<T: Storage>(lens: &[usize], threads: &[usize], r: Reduction) -> f64 {
    let arity = if matches!(r, Reduction::DirectionSquares { .. }) {
        2
    } else {
        1
    };
    let mut out = None;
    for offset in OFFSETS {
        let mut a = Arrays::<T>::new(lens, arity, offset, 5, &[]);
        let batch = a.batch();
        let reference = reduce(r, &batch, Exec::new(Backend::Scalar, 1)).unwrap();
        for backend in Backend::supported() {
            for &t in threads {
                let got = reduce(r, &batch, Exec::new(backend, t)).unwrap();
                assert_eq!(
                    got.to_bits(),
                    reference.to_bits(),
                    "{r:?} {backend:?} threads={t} offset={offset} {:?}: {got} vs {reference}",
                    T::DTYPE
                );
            }
        }
        out = Some(reference);
    }
    out.unwrap()
}

fn tails() -> Vec<usize> {
    (0..=67).collect()
}

fn reductions() -> Vec<Reduction> {
    vec![
        Reduction::SumAbs,
        Reduction::SumSquares,
        Reduction::MaxAbs,
        Reduction::SumPow(3.0),
        Reduction::SumPowTorch(3.0),
        Reduction::SumPowTorch(40.0),
        Reduction::AnyNonfinite,
        Reduction::DirectionSquares {
            l1: 0.1,
            weight_decay: 0.01,
            maximize: true,
        },
    ]
}

fn subgradient_configs() -> Vec<SubgradientConfig> {
    let base = SubgradientConfig {
        step: 0.05,
        l1: 0.0,
        weight_decay: 0.0,
        maximize: false,
    };
    vec![
        base,
        SubgradientConfig { l1: 0.1, ..base },
        SubgradientConfig {
            l1: 0.01,
            weight_decay: 0.1,
            maximize: true,
            ..base
        },
    ]
}

fn run_all_updates<T: Storage>(lens: &[usize], threads: &[usize]) {
    for c in subgradient_configs() {
        check_all_backends::<T>(lens, 2, &[], threads, |b, _, e| {
            subgradient_step(&c, b, e).unwrap()
        });
    }
    check_all_backends::<T>(lens, 2, &[], threads, |b, s, e| {
        accumulate_mean(b, 1.0 / (s + 1) as f64 * 0.7, s == 0, true, e).unwrap()
    });
    for w in [0.001, 0.5, 0.75, 1.0] {
        check_all_backends::<T>(lens, 2, &[], threads, |b, _, e| {
            lerp_average(b, w, e).unwrap()
        });
    }
    check_all_backends::<T>(lens, 2, &[], threads, |b, _, e| {
        scale_into(b, 0.3, e).unwrap()
    });
    check_all_backends::<T>(lens, 1, &[], threads, |b, _, e| {
        scale_into(b, 0.3, e).unwrap()
    });
    for arity in 2..=4 {
        check_all_backends::<T>(lens, arity, &[], threads, |b, _, e| {
            stream_probe(b, e).unwrap()
        });
    }
}

#[test]
fn updates_match_scalar_for_every_tail_and_dtype() {
    run_all_updates::<f32>(&tails(), &[1]);
    run_all_updates::<f64>(&tails(), &[1]);
    run_all_updates::<bf16>(&tails(), &[1]);
    run_all_updates::<f16>(&tails(), &[1]);
}

#[test]
fn reductions_match_scalar_for_every_tail_and_dtype() {
    for r in reductions() {
        check_reduction::<f32>(&tails(), &[1], r);
        check_reduction::<f64>(&tails(), &[1], r);
        check_reduction::<bf16>(&tails(), &[1], r);
        check_reduction::<f16>(&tails(), &[1], r);
        for n in [0usize, 1, 15, 16, 17, 67, 2048, 2049, 5000] {
            check_reduction::<f32>(&[n], &[1], r);
        }
    }
}

#[test]
fn thread_count_never_changes_results() {
    let lens = [200_003, 0, 70_001, 5, 1 << 16];
    for r in reductions() {
        check_reduction::<f32>(&lens, &[1, 2, 3, 7], r);
        check_reduction::<bf16>(&lens, &[1, 4], r);
    }
    run_all_updates::<f32>(&lens, &[1, 2, 3, 7]);
}

#[test]
fn reductions_are_accurate() {
    let mut xs: Vec<f64> = values(3, 10_007);
    let raw = |b: &mut Vec<f64>| RawTensor {
        addr: b.as_mut_ptr() as usize,
        len: b.len(),
        dtype: DType::F64,
    };
    // SAFETY: the vectors outlive the batch and nothing else touches them.
    let batch = unsafe { TensorBatch::new(vec![raw(&mut xs)], 1).unwrap() };
    let e = Exec::new(Backend::active(), 2);
    let got = [
        norm(1.0, &batch, e).unwrap(),
        norm(2.0, &batch, e).unwrap(),
        norm(f64::INFINITY, &batch, e).unwrap(),
        norm(3.0, &batch, e).unwrap(),
    ];
    assert!(norm(0.0, &batch, e).is_err());
    assert!(!any_nonfinite(&batch, e).unwrap());
    drop(batch);
    let want = [
        xs.iter().map(|x| x.abs()).sum::<f64>(),
        xs.iter().map(|x| x * x).sum::<f64>().sqrt(),
        xs.iter().fold(0.0f64, |m, x| m.max(x.abs())),
        xs.iter().map(|x| x.abs().powi(3)).sum::<f64>().cbrt(),
    ];
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-12 * w, "{g} vs {w}");
    }
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        xs[9_999] = bad;
        // SAFETY: the vectors outlive the batch and nothing else touches them.
        let batch = unsafe { TensorBatch::new(vec![raw(&mut xs)], 1).unwrap() };
        assert!(any_nonfinite(&batch, e).unwrap());
        assert!(!norm(2.0, &batch, e).unwrap().is_finite());
    }
}

/// `torch_norm` of f32 (and f64) tensors given as `(len, value)` runs.
fn torch_norm_of<T: Copy>(p: f64, runs: &[(usize, T)], dtype: DType) -> f64 {
    let mut data: Vec<Vec<T>> = runs.iter().map(|&(n, v)| vec![v; n]).collect();
    let raws = data
        .iter_mut()
        .map(|b| RawTensor {
            addr: b.as_mut_ptr() as usize,
            len: b.len(),
            dtype,
        })
        .collect();
    // SAFETY: the vectors outlive the batch and nothing else touches them.
    let batch = unsafe { TensorBatch::new_read_only(raws, 1).unwrap() };
    let got = torch_norm(p, &batch, Exec::new(Backend::active(), 1)).unwrap();
    for threads in [2, 5] {
        let again = torch_norm(p, &batch, Exec::new(Backend::active(), threads)).unwrap();
        assert_eq!(got.to_bits(), again.to_bits());
    }
    got
}

#[test]
fn torch_norm_leaves_f32_range_as_torch_does() {
    let f32_norm = |p: f64, runs: &[(usize, f32)]| torch_norm_of(p, runs, DType::F32);
    let inf = f64::INFINITY;
    // torch's f32 sums overflow: per tensor, and across tensors' norms
    assert_eq!(f32_norm(2.0, &[(4096, 4e17)]), inf);
    assert_eq!(f32_norm(2.0, &[(2, 1.3e19), (2, 1.3e19)]), inf);
    assert_eq!(f32_norm(1000.0, &[(2, 2.0)]), inf);
    assert_eq!(f32_norm(3.0, &[(1, 3e38), (0, 0.0)]), inf);
    // ... or its f32 terms underflow, to 0 or to subnormals
    assert_eq!(f32_norm(3.0, &[(5, 1e-20)]), 0.0);
    let subnormal = f32_norm(3.0, &[(5, 1e-15)]);
    let want = (5.0 * f64::from(f32::from_bits(1))).cbrt();
    assert!(
        (subnormal - want).abs() <= 1e-12 * want,
        "{subnormal} vs {want}"
    );
    // one tensor of one element is |x|, whatever p and dtype
    assert_eq!(f32_norm(3.0, &[(1, -3e38)]), f64::from(3e38f32));
    assert_eq!(f32_norm(3.0, &[(1, 1e-20)]), f64::from(1e-20f32));
    assert_eq!(torch_norm_of(2.0, &[(1, 1e300f64)], DType::F64), 1e300);
    // inside f32's range: `norm`'s f64 result; infinity norms are exact
    let normal = f32_norm(2.0, &[(3, 3.0), (1, 4.0)]);
    assert_eq!(normal, 43f64.sqrt());
    assert_eq!(
        f32_norm(f64::INFINITY, &[(2, 3e38), (1, -1.0)]),
        f64::from(3e38f32)
    );
    assert!(f32_norm(2.0, &[(2, f32::NAN), (1, 3e38)]).is_nan());
}

#[test]
fn subgradient_step_is_the_textbook_formula() {
    let mut p = vec![0.5f64, -1.0, 0.0, 2.0];
    let mut g = vec![0.1f64, -0.2, 0.3, 0.0];
    let c = SubgradientConfig {
        step: 0.1,
        l1: 0.05,
        weight_decay: 0.2,
        maximize: false,
    };
    let want: Vec<f64> = p
        .iter()
        .zip(&g)
        .map(|(&p, &g)| {
            let s = if p > 0.0 {
                1.0
            } else if p < 0.0 {
                -1.0
            } else {
                0.0
            };
            p - 0.1 * (g + 0.05 * s + 0.2 * p)
        })
        .collect();
    let raw = |b: &mut Vec<f64>| RawTensor {
        addr: b.as_mut_ptr() as usize,
        len: 4,
        dtype: DType::F64,
    };
    // SAFETY: the vectors outlive the batch and nothing else touches them.
    let batch = unsafe { TensorBatch::new(vec![raw(&mut p), raw(&mut g)], 2).unwrap() };
    subgradient_step(&c, &batch, Exec::default()).unwrap();
    drop(batch);
    for (a, b) in p.iter().zip(&want) {
        assert!((a - b).abs() < 1e-15, "{a} vs {b}");
    }
}

#[test]
fn running_mean_of_uneven_batches_is_the_weighted_mean() {
    let batches: [(usize, f64); 3] = [(4, 1.0), (4, 2.0), (1, 10.0)];
    let mut mean = vec![0f64; 3];
    let mut grad = vec![0f64; 3];
    let mut seen = 0usize;
    for (i, &(m, v)) in batches.iter().enumerate() {
        grad.iter_mut().for_each(|x| *x = v);
        seen += m;
        let raw = |b: &mut Vec<f64>| RawTensor {
            addr: b.as_mut_ptr() as usize,
            len: 3,
            dtype: DType::F64,
        };
        // SAFETY: the vectors outlive the batch and nothing else touches them.
        let batch = unsafe { TensorBatch::new(vec![raw(&mut mean), raw(&mut grad)], 2).unwrap() };
        accumulate_mean(
            &batch,
            m as f64 / seen as f64,
            i == 0,
            true,
            Exec::default(),
        )
        .unwrap();
        drop(batch);
        assert_eq!(grad, vec![0.0; 3]);
    }
    let want = (4.0 * 1.0 + 4.0 * 2.0 + 10.0) / 9.0;
    for x in mean {
        assert!((x - want).abs() < 1e-15);
    }
}

#[test]
fn stream_probe_streams_each_mix_with_one_multiply_add_per_written_element() {
    let c = 0.999f32;
    let start: [Vec<f32>; 4] =
        std::array::from_fn(|k| (0..37).map(|i| (i * 7 + k) as f32 * 0.01 - 0.2).collect());
    for arity in 2..=4 {
        let mut arrays = start.clone();
        let raws = arrays[..arity]
            .iter_mut()
            .map(|a| RawTensor {
                addr: a.as_mut_ptr() as usize,
                len: a.len(),
                dtype: DType::F32,
            })
            .collect();
        // SAFETY: the vectors outlive the batch and nothing else touches them.
        let batch = unsafe { TensorBatch::new(raws, arity).unwrap() };
        stream_probe(&batch, Exec::new(Backend::Scalar, 1)).unwrap();
        drop(batch);
        let [p, g, m, v] = &start;
        for i in 0..37 {
            let m1 = m[i].mul_add(c, g[i]);
            let v1 = v[i].mul_add(c, g[i]);
            let step = match arity {
                2 => g[i],
                3 => m1,
                _ => m1 + v1,
            };
            assert_eq!(
                arrays[0][i],
                p[i].mul_add(c, step),
                "arity {arity}, param {i}"
            );
            assert_eq!(arrays[1][i], g[i], "the gradient is only read");
            if arity >= 3 {
                assert_eq!(arrays[2][i], m1);
            }
            if arity == 4 {
                assert_eq!(arrays[3][i], v1);
            }
        }
    }
    let mut one = vec![0f32; 4];
    let raw = RawTensor {
        addr: one.as_mut_ptr() as usize,
        len: 4,
        dtype: DType::F32,
    };
    // SAFETY: as above.
    let batch = unsafe { TensorBatch::new(vec![raw], 1).unwrap() };
    assert!(
        stream_probe(&batch, Exec::default()).is_err(),
        "one array is no mix"
    );
}
