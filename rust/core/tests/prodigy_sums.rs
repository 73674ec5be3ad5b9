//! Prodigy's reduction pass: the same bits on every SIMD backend, thread
//! count and misaligned start, for every tail length; and each tensor's sums
//! as a plain float64 loop computes them (to rounding).

use half::{bf16, f16};
use oxoptim_core::{prodigy_sums, Backend, DType, Exec, ProdigySums};

mod common;
use common::{values, Arrays, Storage, OFFSETS};

const SETTINGS: [ProdigySums; 2] = [
    ProdigySums {
        weight_decay: 0.0,
        beta3: 0.99,
        s_weight: 0.5,
    },
    ProdigySums {
        weight_decay: 0.1,
        beta3: 0.5,
        s_weight: 2.0,
    },
];

fn check<T: Storage>(lens: &[usize], threads: &[usize], arity: usize) {
    for c in SETTINGS {
        for offset in OFFSETS {
            let mut a = Arrays::<T>::new(lens, arity, offset, 7, &[]);
            let batch = a.batch();
            let reference = prodigy_sums(&c, &batch, Exec::new(Backend::Scalar, 1)).unwrap();
            for backend in Backend::supported() {
                for &t in threads {
                    let got = prodigy_sums(&c, &batch, Exec::new(backend, t)).unwrap();
                    let bits = |v: &[(f64, f64)]| {
                        v.iter()
                            .map(|(x, y)| (x.to_bits(), y.to_bits()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(
                        bits(&got),
                        bits(&reference),
                        "{backend:?} threads={t} offset={offset}"
                    );
                }
            }
            if T::DTYPE != DType::F64 {
                continue;
            }
            // Against a plain float64 loop over the same values.
            for (slot, (dot, abs)) in reference.iter().enumerate() {
                let x = |k: usize| {
                    values(7 ^ ((slot * 31 + k) as u64), lens[slot] + offset)[offset..].to_vec()
                };
                let (p, g, s) = (x(0), x(1), x(2));
                let (mut want_dot, mut want_abs) = (0.0f64, 0.0f64);
                for i in 0..p.len() {
                    let gi = g[i] + c.weight_decay * p[i];
                    let origin = if arity == 4 { x(3)[i] } else { 0.0 };
                    want_dot += gi * (origin - p[i]);
                    want_abs += (c.beta3 * s[i] + c.s_weight * gi).abs();
                }
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
                assert!(
                    close(*dot, want_dot) && close(*abs, want_abs),
                    "slot {slot}: {dot} {abs} vs {want_dot} {want_abs}"
                );
            }
        }
    }
}

#[test]
fn sums_match_scalar_for_every_tail() {
    let lens: Vec<usize> = (0..=67).collect();
    for arity in [3, 4] {
        check::<f32>(&lens, &[1], arity);
        check::<f64>(&lens, &[1], arity);
        check::<bf16>(&lens, &[1], arity);
        check::<f16>(&lens, &[1], arity);
    }
}

#[test]
fn sums_do_not_depend_on_the_thread_count() {
    let lens = [200_003, 0, 70_001, 5, 1 << 16];
    check::<f32>(&lens, &[1, 2, 3, 7], 4);
    check::<bf16>(&lens, &[1, 2, 3, 7], 4);
}
