//! Every SIMD backend must give results bit-identical to the scalar reference,
//! for every length 0..=67 (vector tails), misaligned starts, all dtypes, and
//! any thread count.

use half::{bf16, f16};
use oxoptim_core::{
    adam_step, sgd_step, AdamConfig, Backend, DType, Exec, RawTensor, SgdConfig, TensorBatch,
};

mod common;
use common::{check_all_backends, Storage};

fn sgd_configs() -> Vec<SgdConfig> {
    let base = SgdConfig {
        lr: 0.05,
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    };
    vec![
        base,
        SgdConfig {
            weight_decay: 0.01,
            maximize: true,
            ..base
        },
        SgdConfig {
            momentum: 0.9,
            ..base
        },
        SgdConfig {
            momentum: 0.9,
            dampening: 0.3,
            weight_decay: 1e-3,
            ..base
        },
        SgdConfig {
            momentum: 0.8,
            nesterov: true,
            weight_decay: 0.1,
            ..base
        },
    ]
}

fn adam_configs() -> Vec<AdamConfig> {
    let base = AdamConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        amsgrad: false,
        maximize: false,
        decoupled_weight_decay: false,
    };
    vec![
        base,
        AdamConfig {
            lr: 0.1,
            weight_decay: 0.05,
            maximize: true,
            ..base
        },
        AdamConfig {
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            ..base
        },
        AdamConfig {
            amsgrad: true,
            beta1: 0.6,
            beta2: 0.5,
            eps: 1e-3,
            ..base
        },
    ]
}

fn tail_lengths() -> Vec<usize> {
    (0..=67).collect()
}

fn run_sgd<T: Storage>(lens: &[usize], threads: &[usize]) {
    for config in sgd_configs() {
        let slots = lens.len();
        check_all_backends::<T>(lens, config.arity(), &[], threads, |batch, s, exec| {
            sgd_step(&config, batch, &vec![s == 0; slots], exec).unwrap()
        });
    }
}

fn run_adam<T: Storage>(lens: &[usize], threads: &[usize]) {
    for config in adam_configs() {
        let slots = lens.len();
        // exp_avg_sq and max_exp_avg_sq start non-negative, as they are in use.
        check_all_backends::<T>(lens, config.arity(), &[3, 4], threads, |batch, s, exec| {
            adam_step(&config, batch, &vec![(s + 1) as f64; slots], exec).unwrap()
        });
    }
}

#[test]
fn sgd_tails_every_dtype() {
    run_sgd::<f32>(&tail_lengths(), &[1]);
    run_sgd::<f64>(&tail_lengths(), &[1]);
    run_sgd::<bf16>(&tail_lengths(), &[1]);
    run_sgd::<f16>(&tail_lengths(), &[1]);
}

#[test]
fn adam_tails_every_dtype() {
    run_adam::<f32>(&tail_lengths(), &[1]);
    run_adam::<f64>(&tail_lengths(), &[1]);
    run_adam::<bf16>(&tail_lengths(), &[1]);
    run_adam::<f16>(&tail_lengths(), &[1]);
}

#[test]
fn thread_count_never_changes_results() {
    // Large and odd sizes so that the work split differs with the thread count.
    let lens = [200_003, 0, 70_001, 5, 1 << 16];
    run_sgd::<f32>(&lens, &[1, 2, 3, 7]);
    run_adam::<f32>(&lens, &[1, 2, 3, 7]);
    run_adam::<bf16>(&lens, &[1, 4]);
}

#[test]
fn adam_scalar_matches_textbook_formula_in_f64() {
    // One step of Adam from zero state, written out by hand.
    let config = adam_configs()[0];
    let mut p = vec![0.5f64, -1.0, 2.0];
    let mut g = vec![0.1f64, -0.2, 0.0];
    let mut m = vec![0.0f64; 3];
    let mut v = vec![0.0f64; 3];
    let expected: Vec<f64> = p
        .iter()
        .zip(&g)
        .map(|(&p, &g)| {
            let m = 0.1 * g;
            let v = 0.001 * g * g;
            let m_hat = m / (1.0 - 0.9);
            let v_hat = v / (1.0 - 0.999);
            p - 1e-3 * m_hat / (v_hat.sqrt() + 1e-8)
        })
        .collect();
    let raw = |b: &mut Vec<f64>| RawTensor {
        addr: b.as_mut_ptr() as usize,
        len: 3,
        dtype: DType::F64,
    };
    let arrays = vec![raw(&mut p), raw(&mut g), raw(&mut m), raw(&mut v)];
    // SAFETY: the vectors outlive the batch.
    let batch = unsafe { TensorBatch::new(arrays, 4).unwrap() };
    adam_step(&config, &batch, &[1.0], Exec::new(Backend::Scalar, 1)).unwrap();
    drop(batch);
    for (a, b) in p.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn wrong_arity_is_an_error_not_a_write() {
    let mut p = vec![1.0f32; 4];
    let mut g = vec![1.0f32; 4];
    let raw = |b: &mut Vec<f32>| RawTensor {
        addr: b.as_mut_ptr() as usize,
        len: 4,
        dtype: DType::F32,
    };
    // SAFETY: the vectors outlive the batch and nothing else touches them.
    let batch = unsafe { TensorBatch::new(vec![raw(&mut p), raw(&mut g)], 2).unwrap() };
    let momentum = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    };
    assert!(sgd_step(&momentum, &batch, &[true], Exec::default()).is_err());
    drop(batch);
    assert_eq!(p, vec![1.0; 4]);
}
