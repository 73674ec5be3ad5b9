//! Property tests of the unsafe boundary: random lengths, alignments and
//! layouts of arrays inside one guarded allocation. A batch is accepted
//! exactly when it is well formed and disjoint, and a step never writes
//! outside the arrays it was given.

use oxoptim_core::{
    adam_step, sgd_step, AdamConfig, Backend, DType, Exec, RawTensor, SgdConfig, TensorBatch,
};
use proptest::prelude::*;

const GUARD: f32 = 7777.0;
const POOL: usize = 4096;

/// Start/length pairs (in f32 elements) inside a pool of `POOL` elements.
fn spans(max_slots: usize) -> impl Strategy<Value = Vec<(usize, usize)>> {
    prop::collection::vec((0usize..POOL - 200, 0usize..150), 1..=max_slots * 3)
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn accepted_iff_well_formed_and_disjoint(raw in spans(4), byte_shift in 0usize..4) {
        let arity = 3;
        let n_slots = raw.len() / arity;
        prop_assume!(n_slots > 0);
        // Make each slot's arrays share a length so that only overlap and alignment vary.
        let mut spans: Vec<(usize, usize)> = raw[..n_slots * arity].to_vec();
        for slot in 0..n_slots {
            let len = spans[slot * arity].1;
            for k in 0..arity {
                spans[slot * arity + k].1 = len;
            }
        }
        let mut pool = vec![GUARD; POOL];
        let base = pool.as_mut_ptr() as usize + byte_shift;
        let arrays: Vec<RawTensor> = spans
            .iter()
            .map(|&(start, len)| RawTensor { addr: base + start * 4, len, dtype: DType::F32 })
            .collect();
        let disjoint = (0..spans.len()).all(|i| (i + 1..spans.len()).all(|j| !overlaps(spans[i], spans[j])));
        let aligned = byte_shift == 0 || spans.iter().all(|s| s.1 == 0);
        // SAFETY: every span lies inside `pool`, which outlives the batch.
        let batch = unsafe { TensorBatch::new(arrays, arity) };
        prop_assert_eq!(batch.is_ok(), disjoint && aligned, "{:?} shift {}", spans, byte_shift);

        if let Ok(batch) = batch {
            let config = SgdConfig { lr: 0.5, momentum: 0.9, dampening: 0.0, weight_decay: 0.1, nesterov: true, maximize: false };
            for backend in Backend::supported() {
                sgd_step(&config, &batch, &vec![false; n_slots], Exec::new(backend, 2)).unwrap();
            }
            drop(batch);
            for (i, v) in pool.iter().enumerate() {
                let inside = spans.iter().any(|&(s, l)| i >= s && i < s + l);
                if !inside {
                    prop_assert_eq!(*v, GUARD, "element {} outside every array was written", i);
                }
            }
        }
    }

    #[test]
    fn adam_writes_only_inside_its_arrays(lens in prop::collection::vec(0usize..300, 1..6), gap in 1usize..9, threads in 1usize..4) {
        let arity = 5;
        let total: usize = lens.iter().map(|l| (l + gap) * arity).sum::<usize>() + gap;
        let mut pool = vec![GUARD; total];
        let mut arrays = Vec::new();
        let mut spans = Vec::new();
        let mut at = gap;
        for &len in &lens {
            for k in 0..arity {
                // exp_avg_sq and max_exp_avg_sq must start non-negative: take the guard.
                if k < 3 {
                    for v in &mut pool[at..at + len] {
                        *v = 0.25;
                    }
                }
                arrays.push(RawTensor { addr: pool.as_mut_ptr() as usize + at * 4, len, dtype: DType::F32 });
                spans.push((at, len));
                at += len + gap;
            }
        }
        let config = AdamConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0, amsgrad: true, maximize: false, decoupled_weight_decay: false };
        // SAFETY: spans lie inside `pool` and are disjoint by construction.
        let batch = unsafe { TensorBatch::new(arrays, arity) }.unwrap();
        adam_step(&config, &batch, &vec![1.0; lens.len()], Exec::new(Backend::active(), threads)).unwrap();
        drop(batch);
        for (i, v) in pool.iter().enumerate() {
            if !spans.iter().any(|&(s, l)| i >= s && i < s + l) {
                prop_assert_eq!(*v, GUARD);
            }
        }
    }
}
