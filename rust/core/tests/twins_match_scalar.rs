//! Every torch twin of the table (`OPTIMIZERS`), driven through its generic
//! entry point: each SIMD backend gives results bit-identical to the scalar
//! reference for every length 0..=67, misaligned starts, all dtypes and any
//! thread count, under settings that reach every branch of the kernel.

use half::{bf16, f16};
use oxoptim_core::optimizer::find;
use oxoptim_core::{DType, HyperValue, RawTensor, ScalarState, OPTIMIZERS};
use std::cell::RefCell;

mod common;
use common::{check_all_backends, Storage};

use HyperValue::{Flag, Float, Pair};

/// One setting of one optimizer: its hyper-parameters, the initial values of
/// its scalar state (torch's: step 0, ...) and which arrays start non-negative
/// (second moments and the like, after `[param, grad]`).
struct Case {
    name: &'static str,
    hyper: Vec<(&'static str, HyperValue)>,
    scalars: &'static [f64],
    nonneg: &'static [usize],
}

fn case(
    name: &'static str,
    hyper: &[(&'static str, HyperValue)],
    scalars: &'static [f64],
    nonneg: &'static [usize],
) -> Case {
    Case {
        name,
        hyper: hyper.to_vec(),
        scalars,
        nonneg,
    }
}

fn cases() -> Vec<Case> {
    let rmsprop = |lr: f64, momentum: f64, centered: bool, wd: f64, maximize: bool| {
        case(
            "rmsprop",
            &[
                ("lr", Float(lr)),
                ("alpha", Float(0.9)),
                ("eps", Float(1e-3)),
                ("weight_decay", Float(wd)),
                ("momentum", Float(momentum)),
                ("centered", Flag(centered)),
                ("maximize", Flag(maximize)),
            ],
            &[0.0],
            &[2],
        )
    };
    let adagrad = |lr_decay: f64, wd: f64, maximize: bool| {
        case(
            "adagrad",
            &[
                ("lr", Float(0.05)),
                ("lr_decay", Float(lr_decay)),
                ("weight_decay", Float(wd)),
                ("eps", Float(1e-10)),
                ("maximize", Flag(maximize)),
            ],
            &[0.0],
            &[2],
        )
    };
    let adamax = |betas: (f64, f64), wd: f64, maximize: bool| {
        case(
            "adamax",
            &[
                ("lr", Float(0.01)),
                ("betas", Pair(betas.0, betas.1)),
                ("eps", Float(1e-8)),
                ("weight_decay", Float(wd)),
                ("maximize", Flag(maximize)),
            ],
            &[0.0],
            &[3],
        )
    };
    let nadam = |wd: f64, decoupled: bool, maximize: bool| {
        case(
            "nadam",
            &[
                ("lr", Float(0.02)),
                ("betas", Pair(0.9, 0.999)),
                ("eps", Float(1e-8)),
                ("weight_decay", Float(wd)),
                ("momentum_decay", Float(4e-3)),
                ("decoupled_weight_decay", Flag(decoupled)),
                ("maximize", Flag(maximize)),
            ],
            &[0.0, 1.0],
            &[3],
        )
    };
    // RAdam rectifies from its 6th step with beta2 = 0.999 (these start at step 10), never with 0.5.
    let radam = |beta2: f64, wd: f64, decoupled: bool, maximize: bool| {
        case(
            "radam",
            &[
                ("lr", Float(0.02)),
                ("betas", Pair(0.9, beta2)),
                ("eps", Float(1e-8)),
                ("weight_decay", Float(wd)),
                ("decoupled_weight_decay", Flag(decoupled)),
                ("maximize", Flag(maximize)),
            ],
            &[10.0],
            &[3],
        )
    };
    let adadelta = |lr: f64, wd: f64, maximize: bool| {
        case(
            "adadelta",
            &[
                ("lr", Float(lr)),
                ("rho", Float(0.9)),
                ("eps", Float(1e-6)),
                ("weight_decay", Float(wd)),
                ("maximize", Flag(maximize)),
            ],
            &[0.0],
            &[2, 3],
        )
    };
    // ASGD copies the parameter into `ax` while mu == 1 (from step 0), averages otherwise.
    let asgd = |scalars: &'static [f64], wd: f64, maximize: bool| {
        case(
            "asgd",
            &[
                ("lr", Float(0.05)),
                ("lambd", Float(0.01)),
                ("alpha", Float(0.75)),
                ("t0", Float(2.0)),
                ("weight_decay", Float(wd)),
                ("maximize", Flag(maximize)),
                ("default_float32", Flag(true)),
            ],
            scalars,
            &[],
        )
    };
    // Rprop's step sizes (array 3) start positive; tight bounds make the clamp bite.
    let rprop = |step_sizes: (f64, f64), maximize: bool| {
        case(
            "rprop",
            &[
                ("etas", Pair(0.5, 1.2)),
                ("step_sizes", Pair(step_sizes.0, step_sizes.1)),
                ("maximize", Flag(maximize)),
            ],
            &[0.0],
            &[3],
        )
    };
    let lion = |betas: (f64, f64), wd: f64| {
        case(
            "lion",
            &[
                ("lr", Float(0.01)),
                ("betas", Pair(betas.0, betas.1)),
                ("weight_decay", Float(wd)),
            ],
            &[],
            &[],
        )
    };
    let adamw_sf = |ckp1: f64, wd: f64| {
        case(
            "adamw_schedulefree",
            &[
                ("lr", Float(0.01)),
                ("betas", Pair(0.9, 0.999)),
                ("eps", Float(1e-8)),
                ("weight_decay", Float(wd)),
                ("ckp1", Float(ckp1)),
                ("bias_correction2", Float(0.3)),
            ],
            &[],
            &[3],
        )
    };
    let sgd_sf = |ckp1: f64, wd: f64| {
        case(
            "sgd_schedulefree",
            &[
                ("lr", Float(0.1)),
                ("momentum", Float(0.9)),
                ("weight_decay", Float(wd)),
                ("ckp1", Float(ckp1)),
            ],
            &[],
            &[],
        )
    };
    // Prodigy: beta1 = 0 drops exp_avg (exp_avg_sq moves to array 2); lr 0 freezes the moments.
    let prodigy = |beta1: f64, lr: f64, wd: f64, decouple: bool, safeguard: bool| {
        case(
            "prodigy",
            &[
                ("lr", Float(lr)),
                ("betas", Pair(beta1, 0.99)),
                ("beta3", Float(0.995)),
                ("eps", Float(1e-8)),
                ("weight_decay", Float(wd)),
                ("decouple", Flag(decouple)),
                ("d", Float(1e-3)),
                ("d0", Float(1e-6)),
                ("d_next", Float(2e-3)),
                ("dlr", Float(1e-3)),
                ("safeguard_warmup", Flag(safeguard)),
            ],
            &[],
            if beta1 > 0.0 { &[3] } else { &[2] },
        )
    };
    vec![
        prodigy(0.9, 1.0, 0.0, true, false),
        prodigy(0.9, 1.0, 0.1, false, true),
        prodigy(0.0, 1.0, 0.1, true, false),
        prodigy(0.9, 0.0, 0.1, true, false),
        // ckp1 below and above 1/2: both branches of torch's lerp.
        adamw_sf(0.25, 0.0),
        adamw_sf(0.75, 0.1),
        sgd_sf(0.25, 0.1),
        sgd_sf(1.0, 0.0),
        lion((0.9, 0.99), 0.0),
        lion((0.5, 0.3), 0.1),
        rprop((1e-6, 50.0), false),
        rprop((0.3, 1.1), true),
        asgd(&[0.0, 0.05, 1.0], 0.0, false),
        asgd(&[5.0, 0.04, 0.25], 0.1, true),
        adadelta(1.0, 0.0, false),
        adadelta(0.5, 0.1, true),
        radam(0.999, 0.0, false, false),
        radam(0.5, 0.1, false, true),
        radam(0.5, 0.1, true, false),
        nadam(0.0, false, false),
        nadam(0.1, false, true),
        nadam(0.1, true, false),
        adamax((0.9, 0.999), 0.0, false),
        adamax((0.3, 0.5), 0.1, true),
        adagrad(0.0, 0.0, false),
        adagrad(0.5, 0.1, true),
        rmsprop(0.01, 0.0, false, 0.0, false),
        rmsprop(0.01, 0.9, false, 0.1, true),
        rmsprop(0.1, 0.0, true, 0.0, false),
        rmsprop(0.05, 0.5, true, 0.01, false),
    ]
}

/// Runs `case` on every backend with storage type `T`.
fn run<T: Storage>(case: &Case, lens: &[usize], threads: &[usize]) {
    let entry = find(OPTIMIZERS, case.name).unwrap();
    let hyper = case
        .hyper
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let configured = entry.configure(hyper).unwrap();
    let arity = 2 + configured.state_keys().len();
    // Scalar state cells, reset at each run's first step.
    let cells = RefCell::new(Vec::<f64>::new());
    check_all_backends::<T>(lens, arity, case.nonneg, threads, |batch, s, exec| {
        let mut cells = cells.borrow_mut();
        if s == 0 {
            *cells = (0..lens.len())
                .flat_map(|_| case.scalars.iter().copied())
                .collect();
        }
        let raws = cells
            .iter_mut()
            .map(|c| RawTensor {
                addr: c as *mut f64 as usize,
                len: 1,
                dtype: DType::F64,
            })
            .collect();
        // SAFETY: the cells outlive the state and nothing else touches them meanwhile.
        let mut scalars = unsafe { ScalarState::new(raws, case.scalars.len(), batch) }.unwrap();
        entry
            .step(configured.as_ref(), batch, &mut scalars, exec)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    });
}

#[test]
fn every_twin_matches_scalar_for_every_tail_and_dtype() {
    let lens: Vec<usize> = (0..=67).collect();
    for case in cases() {
        run::<f32>(&case, &lens, &[1]);
        run::<f64>(&case, &lens, &[1]);
        run::<bf16>(&case, &lens, &[1]);
        run::<f16>(&case, &lens, &[1]);
    }
}

#[test]
fn every_twin_is_independent_of_the_thread_count() {
    // Large and odd sizes so that the work split differs with the thread count.
    let lens = [200_003, 0, 70_001, 5, 1 << 16];
    for case in cases() {
        run::<f32>(&case, &lens, &[1, 2, 3, 7]);
    }
}

#[test]
fn every_table_row_has_a_case() {
    let cases = cases();
    for e in OPTIMIZERS {
        if !matches!(
            e.name,
            "sgd" | "adam" | "adam8bit" | "sgd8bit" | "adafactor"
        ) {
            // SGD and Adam have their own tests in simd_matches_scalar.rs,
            // 8-bit Adam and SGD (state not shaped like the parameter) in lowbit.rs and lowbit_sgd.rs,
            // Adafactor (factored state) in adafactor_matches_scalar.rs.
            assert!(
                cases.iter().any(|c| c.name == e.name),
                "no SIMD case for {}",
                e.name
            );
        }
    }
}
