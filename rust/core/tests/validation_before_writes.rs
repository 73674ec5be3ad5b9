//! A refused call writes nothing: not the arrays, and not Adam's step
//! counters, which are incremented only after everything else was checked.

use oxoptim_core::{
    adam_step_counted, AdamConfig, Backend, DType, Error, Exec, RawTensor, StepCounters,
    TensorBatch,
};

fn raw(v: &mut [f32]) -> RawTensor {
    RawTensor {
        addr: v.as_mut_ptr() as usize,
        len: v.len(),
        dtype: DType::F32,
    }
}

fn config(amsgrad: bool) -> AdamConfig {
    AdamConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        amsgrad,
        maximize: false,
        decoupled_weight_decay: false,
    }
}

#[test]
fn a_refused_adam_step_leaves_counters_and_arrays_as_they_were() {
    let (mut p, mut g, mut m, mut v) = (
        vec![1.0f32; 8],
        vec![0.5f32; 8],
        vec![0f32; 8],
        vec![0f32; 8],
    );
    let mut step = [3.0f32];
    let exec = Exec::new(Backend::active(), 1);
    // SAFETY: the vectors outlive the batch and counters; nothing else touches them.
    let (batch, counters) = unsafe {
        let batch =
            TensorBatch::new(vec![raw(&mut p), raw(&mut g), raw(&mut m), raw(&mut v)], 4).unwrap();
        let counters = StepCounters::new(vec![raw(&mut step)], &batch).unwrap();
        (batch, counters)
    };
    // AMSGrad needs a fifth array per tensor: refused, nothing written.
    let refused = adam_step_counted(&config(true), &batch, &counters, exec);
    assert!(matches!(refused, Err(Error::Mismatch(_))));
    // SAFETY: reading the counter the batch describes; no call is running.
    let after_refusal = unsafe { *(counters.cells()[0].addr as *const f32) };
    assert_eq!(after_refusal, 3.0, "a refused step incremented the counter");
    adam_step_counted(&config(false), &batch, &counters, exec).unwrap();
    drop((batch, counters));
    assert_eq!(step, [4.0]);
    assert_eq!(g, vec![0.5f32; 8]);
    assert!(
        p.iter().all(|&x| x < 1.0),
        "the accepted step did not update"
    );
}
