//! A refused call writes nothing: not the arrays, and not the scalar state
//! (step counters, ...), which is written only after everything else was
//! checked.

use oxoptim_core::optimizer::find;
use oxoptim_core::{
    Backend, DType, Error, Exec, HyperValue, RawTensor, ScalarState, TensorBatch, OPTIMIZERS,
};

fn raw(v: &mut [f32]) -> RawTensor {
    RawTensor {
        addr: v.as_mut_ptr() as usize,
        len: v.len(),
        dtype: DType::F32,
    }
}

fn adam_hyper(amsgrad: bool) -> Vec<(String, HyperValue)> {
    use HyperValue::*;
    [
        ("lr", Float(0.1)),
        ("betas", Pair(0.9, 0.999)),
        ("eps", Float(1e-8)),
        ("weight_decay", Float(0.0)),
        ("amsgrad", Flag(amsgrad)),
        ("maximize", Flag(false)),
        ("decoupled_weight_decay", Flag(false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
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
    let entry = find(OPTIMIZERS, "adam").unwrap();
    // AMSGrad needs a fifth array per tensor.
    let amsgrad = entry.configure(adam_hyper(true)).unwrap();
    let plain = entry.configure(adam_hyper(false)).unwrap();
    // SAFETY: the vectors outlive the batch and the scalar state; nothing else touches them.
    let (batch, mut scalars) = unsafe {
        let batch =
            TensorBatch::new(vec![raw(&mut p), raw(&mut g), raw(&mut m), raw(&mut v)], 4).unwrap();
        let scalars = ScalarState::new(vec![raw(&mut step)], 1, &batch).unwrap();
        (batch, scalars)
    };
    let before = p.clone();
    // Refused through the table entry, and by the optimizer itself.
    let refused = entry.step(amsgrad.as_ref(), &batch, &mut scalars, exec);
    assert!(matches!(refused, Err(Error::Mismatch(_))));
    assert_eq!(
        scalars.get(0, 0),
        3.0,
        "a refused step incremented the counter"
    );
    let refused = amsgrad.step(&batch, &mut scalars, exec);
    assert!(matches!(refused, Err(Error::Mismatch(_))));
    assert_eq!(
        scalars.get(0, 0),
        3.0,
        "a refused step incremented the counter"
    );
    // SAFETY: reading memory the batch describes; no call is running.
    let p_now = unsafe { std::slice::from_raw_parts(batch.arrays()[0].addr as *const f32, 8) };
    assert_eq!(p_now, &before[..], "a refused step wrote the parameter");
    entry
        .step(plain.as_ref(), &batch, &mut scalars, exec)
        .unwrap();
    drop((batch, scalars));
    assert_eq!(step, [4.0]);
    assert_eq!(g, vec![0.5f32; 8]);
    assert!(
        p.iter().all(|&x| x < 1.0),
        "the accepted step did not update"
    );
}

/// Every optimizer of the table, given one array too few per tensor or a
/// scalar row of the wrong width: refused, no scalar cell written.
#[test]
fn every_optimizer_refuses_a_bad_batch_before_writing_scalars() {
    let exec = Exec::new(Backend::active(), 1);
    for entry in OPTIMIZERS {
        // Build a configuration from any accepted settings: reuse the defaults
        // of each kind.
        let hyper: Vec<(String, HyperValue)> = entry
            .hyper
            .iter()
            .map(|(k, kind)| {
                let v = match kind {
                    oxoptim_core::HyperKind::Float => HyperValue::Float(default_float(k)),
                    oxoptim_core::HyperKind::Flag => HyperValue::Flag(false),
                    oxoptim_core::HyperKind::Pair => HyperValue::Pair(pair(k).0, pair(k).1),
                };
                (k.to_string(), v)
            })
            .collect();
        let configured = entry
            .configure(hyper)
            .unwrap_or_else(|e| panic!("{}: {e}", entry.name));
        let arity = 2 + configured.state_keys().len();
        // One array short (but at least the parameter).
        let short = arity - 1;
        let mut arrays: Vec<Vec<f32>> = (0..short).map(|_| vec![0.5f32; 4]).collect();
        let mut cells: Vec<f32> = vec![3.0; entry.scalars.len()];
        let raws: Vec<RawTensor> = arrays.iter_mut().map(|a| raw(a)).collect();
        let cell_raws: Vec<RawTensor> = cells.chunks_mut(1).map(raw).collect();
        // SAFETY: the vectors outlive batch and state; nothing else touches them.
        let (batch, mut scalars) = unsafe {
            let batch = TensorBatch::new(raws, short).unwrap();
            let s = ScalarState::new(cell_raws, entry.scalars.len(), &batch).unwrap();
            (batch, s)
        };
        let r = entry.step(configured.as_ref(), &batch, &mut scalars, exec);
        assert!(matches!(r, Err(Error::Mismatch(_))), "{}", entry.name);
        drop((batch, scalars));
        assert!(
            cells.iter().all(|&c| c == 3.0),
            "{}: scalar written",
            entry.name
        );
        assert!(
            arrays.iter().all(|a| a.iter().all(|&x| x == 0.5)),
            "{}: array written",
            entry.name
        );
    }
}

fn default_float(key: &str) -> f64 {
    match key {
        "lr" => 0.01,
        "eps" => 1e-8,
        "rho" | "alpha" | "momentum" => 0.9, // momentum on: 8-bit SGD refuses it off
        "lambd" => 1e-4,
        "t0" => 1e6,
        _ => 0.0,
    }
}

fn pair(key: &str) -> (f64, f64) {
    match key {
        "etas" => (0.5, 1.2),
        "step_sizes" => (1e-6, 50.0),
        _ => (0.9, 0.999),
    }
}
