//! Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive
//! Parameter-Free Learner"), operation for operation as the reference
//! package `prodigyopt` (1.1) with `slice_p=1`.
//!
//! A step has two passes. [`prodigy_sums`] reads every tensor and returns
//! its two terms of the global estimate of `d`, before anything is written:
//! `dot(g, p0 − p)` and `Σ|s'|` with `s' = β3·s + s_weight·g` (the caller
//! combines them over all groups in Python, as the reference does, and
//! moves `d` on). The table kernel then updates each element:
//!
//! ```text
//! m ← β1·m + d·(1 − β1)·g;   v ← β2·v + d²·(1 − β2)·g²;   s ← β3·s + s_weight·g
//! p ← p − wd·dlr·p (decoupled);   p ← p − dlr·m / (√v + d'·eps)   (β1 = 0: d'·dlr·g)
//! ```
//!
//! with `d` the estimate the step started from and `d'` the new one; the
//! moments and `s` move only in groups whose `lr` is positive. `g` carries
//! the coupled weight decay when `decouple` is off.

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::{Element, WithLanes};
use crate::engine::{self, Exec};
use crate::error::{Error, Result};
use crate::reduce::{BLOCK, VIRTUAL_LANES};
use crate::simd::{Lanes, Scalar};
use crate::tensors::{DType, ScalarState, TensorBatch};
use half::{bf16, f16};
use std::sync::atomic::{AtomicU64, Ordering};

optimizer! {
    /// One group's settings for one step, with the optimizer-wide numbers of
    /// the step computed by the caller: `d` (the estimate the step starts
    /// from), `d_next` (after this step's update), `dlr = d·lr·bias_correction`.
    pub struct ProdigyConfig = "prodigy" {
        /// The group's `lr`: the moments move only when it is positive.
        lr: f64,
        betas: (beta1, beta2),
        /// Resolved (`sqrt(β2)` for the reference's `None`).
        beta3: f64,
        eps: f64,
        weight_decay: f64,
        decouple: bool,
        d: f64,
        d0: f64,
        d_next: f64,
        dlr: f64,
        safeguard_warmup: bool,
    }
    // The reference keeps `exp_avg` only when β1 > 0; `s` is flat (the
    // parameter's elements, `slice_p=1`).
    state: ["exp_avg" if beta1 > 0.0, "exp_avg_sq", "s"],
    scalars: [],
    impl {
        const FLAT_STATE: &'static [&'static str] = &["s"];

        fn check(&self, batch: &TensorBatch, scalars: &ScalarState, _exec: Exec) -> Result<()> {
            super::declare::check(self, batch, scalars)
        }

        fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
            super::declare::step(self, batch, scalars, exec)
        }
    }
}

impl ProdigyConfig {
    /// The gradient's weight in `s`, as the reference computes it in Python.
    pub fn s_weight(&self) -> f64 {
        if self.safeguard_warmup {
            (self.d / self.d0) * self.d
        } else {
            (self.d / self.d0) * self.dlr
        }
    }

    /// The weight decay added to the gradient (coupled), if any.
    fn coupled_decay(&self) -> Option<f64> {
        (self.weight_decay != 0.0 && !self.decouple).then_some(self.weight_decay)
    }
}

impl PerElement for ProdigyConfig {
    type Slot = ();
    type Update<T: Element> = ProdigyUpdate<T>;

    fn update<T: Element>(&self, _: ()) -> ProdigyUpdate<T> {
        let t = T::from_f64;
        ProdigyUpdate {
            moments: self.lr > 0.0,
            coupled_decay: self.coupled_decay().map(t),
            beta1: t(self.beta1),
            exp_avg_weight: t(self.d * (1.0 - self.beta1)),
            beta2: t(self.beta2),
            exp_avg_sq_weight: t(self.d * self.d * (1.0 - self.beta2)),
            beta3: t(self.beta3),
            s_weight: t(self.s_weight()),
            eps: t(self.d_next * self.eps),
            param_decay: (self.weight_decay != 0.0 && self.decouple)
                .then(|| t(-self.weight_decay * self.dlr)),
            with_exp_avg: self.beta1 > 0.0,
            step: t(if self.beta1 > 0.0 {
                -self.dlr
            } else {
                -self.dlr * self.d_next
            }),
        }
    }
}

pub(crate) struct ProdigyUpdate<T> {
    moments: bool,
    coupled_decay: Option<T>,
    beta1: T,
    exp_avg_weight: T,
    beta2: T,
    exp_avg_sq_weight: T,
    beta3: T,
    s_weight: T,
    /// `d_next · eps`.
    eps: T,
    /// `-weight_decay · dlr` when decoupled.
    param_decay: Option<T>,
    with_exp_avg: bool,
    /// `-dlr`, or `-dlr · d_next` without `exp_avg`.
    step: T,
}

impl<T: Element> LaneUpdate<T> for ProdigyUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(
        &self,
        s: S,
        [param, grad, exp_avg, exp_avg_sq, sum, ..]: Arrays<T>,
    ) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements;
        // `exp_avg` is only touched when β1 > 0, where it was passed.
        unsafe {
            let mut p = s.load(param);
            let mut g = s.load(grad);
            if let Some(wd) = self.coupled_decay {
                // grad.add_(p, alpha=decay)
                g = s.mul_add(p, s.splat(wd), g);
            }
            let mut m = g;
            let mut v = s.load(exp_avg_sq);
            if self.with_exp_avg {
                m = s.load(exp_avg);
            }
            if self.moments {
                if self.with_exp_avg {
                    // exp_avg.mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                    m = s.mul_add(
                        g,
                        s.splat(self.exp_avg_weight),
                        s.mul(m, s.splat(self.beta1)),
                    );
                    s.store(exp_avg, m);
                }
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                v = s.mul(v, s.splat(self.beta2));
                v = s.mul_add(s.mul(s.splat(self.exp_avg_sq_weight), g), g, v);
                s.store(exp_avg_sq, v);
                // s.mul_(beta3).add_(grad, alpha=s_weight)
                let s_next = s.mul_add(
                    g,
                    s.splat(self.s_weight),
                    s.mul(s.load(sum), s.splat(self.beta3)),
                );
                s.store(sum, s_next);
            }
            // denom = exp_avg_sq.sqrt().add_(d * eps)
            let denom = s.add(s.sqrt(v), s.splat(self.eps));
            if let Some(decay) = self.param_decay {
                // p.add_(p, alpha=-decay * dlr)
                p = s.mul_add(p, s.splat(decay), p);
            }
            // p.addcdiv_(exp_avg, denom, value=-dlr), or (grad, denom, value=-dlr * d)
            p = s.add(p, s.div(s.mul(s.splat(self.step), m), denom));
            s.store(param, p);
        }
    }
}

/// What [`prodigy_sums`] reads: a group's coupled decay and `s`'s update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProdigySums {
    /// Added to the gradient (`grad.add_(p, alpha=weight_decay)`); 0 for none.
    pub weight_decay: f64,
    pub beta3: f64,
    /// See [`ProdigyConfig::s_weight`].
    pub s_weight: f64,
}

impl ProdigySums {
    pub fn of(config: &ProdigyConfig) -> ProdigySums {
        ProdigySums {
            weight_decay: config.coupled_decay().unwrap_or(0.0),
            beta3: config.beta3,
            s_weight: config.s_weight(),
        }
    }
}

/// Each tensor's `(dot(g, p0 − p), Σ|β3·s + s_weight·g|)` over a read-only
/// batch of `[param, grad, s, p0]` slots, or `[param, grad, s]` for
/// parameters whose `p0` is the reference's 0-d zero (a parameter that was
/// all zeros). Each sum is folded in fixed blocks and lanes and rounded to
/// the tensor's dtype, as torch's `dot(...).item()` returns it, so results
/// do not depend on the thread count or the SIMD backend. bfloat16 and
/// float16 tensors are widened (exactly) and summed in float32, as their
/// update is computed: torch's half-precision `dot` depends on its threads.
pub fn prodigy_sums(c: &ProdigySums, batch: &TensorBatch, exec: Exec) -> Result<Vec<(f64, f64)>> {
    if !(3..=4).contains(&batch.arity()) {
        return Err(Error::Mismatch(format!(
            "prodigy_sums expects 3 or 4 arrays per tensor, got {}",
            batch.arity()
        )));
    }
    if let Some(slot) = (0..batch.slots()).find(|&i| {
        !matches!(
            batch.slot(i).dtype,
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
    }) {
        return Err(Error::Unsupported(format!(
            "prodigy_sums: tensor {slot} is {}; floating point only",
            batch.slot(slot).dtype.name()
        )));
    }
    let mut items = Vec::new();
    for slot in 0..batch.slots() {
        let len = batch.slot(slot).len;
        items.extend(
            (0..len)
                .step_by(BLOCK)
                .map(|start| (slot, start, (start + BLOCK).min(len))),
        );
    }
    let partial: Vec<[AtomicU64; 2]> = items.iter().map(|_| Default::default()).collect();
    let indexed: Vec<usize> = (0..items.len()).collect();
    engine::for_each_item(&indexed, exec.threads, batch.total_len(), |&i| {
        let (slot, start, end) = items[i];
        // SAFETY: the dtype picks T; the batch is only read.
        let (dot, abs) = unsafe {
            match batch.slot(slot).dtype {
                DType::F32 => {
                    batch.with_read_slices::<f32, _>(slot, start..end, |a| fold_block(c, exec, a))
                }
                DType::BF16 => batch.with_read_slices::<bf16, _>(slot, start..end, |a| {
                    fold_widened(c, exec, a, bf16::to_f32)
                }),
                DType::F16 => batch.with_read_slices::<f16, _>(slot, start..end, |a| {
                    fold_widened(c, exec, a, f16::to_f32)
                }),
                _ => batch.with_read_slices::<f64, _>(slot, start..end, |a| fold_block(c, exec, a)),
            }
        };
        partial[i][0].store(dot.to_bits(), Ordering::Relaxed);
        partial[i][1].store(abs.to_bits(), Ordering::Relaxed);
    });
    let mut sums = vec![(0.0, 0.0); batch.slots()];
    for ((slot, _, _), [dot, abs]) in items.iter().zip(&partial) {
        sums[*slot].0 += f64::from_bits(dot.load(Ordering::Relaxed));
        sums[*slot].1 += f64::from_bits(abs.load(Ordering::Relaxed));
    }
    for (slot, (dot, abs)) in sums.iter_mut().enumerate() {
        if batch.slot(slot).dtype != DType::F64 {
            (*dot, *abs) = (*dot as f32 as f64, *abs as f32 as f64);
        }
    }
    Ok(sums)
}

/// Both sums of one block of half-precision arrays, widened to float32 first.
fn fold_widened<H: Copy>(
    c: &ProdigySums,
    exec: Exec,
    arrays: &[&[H]],
    widen: fn(H) -> f32,
) -> (f64, f64) {
    let wide: Vec<Vec<f32>> = arrays
        .iter()
        .map(|a| a.iter().map(|&x| widen(x)).collect())
        .collect();
    let slices: Vec<&[f32]> = wide.iter().map(Vec::as_slice).collect();
    fold_block(c, exec, &slices)
}

/// Both sums of one block (at most [`BLOCK`] elements).
fn fold_block<T: Element>(c: &ProdigySums, exec: Exec, arrays: &[&[T]]) -> (f64, f64) {
    let mut body = Fold {
        weight_decay: (c.weight_decay != 0.0).then(|| T::from_f64(c.weight_decay)),
        beta3: T::from_f64(c.beta3),
        s_weight: T::from_f64(c.s_weight),
        arrays,
        out: (0.0, 0.0),
    };
    T::dispatch(exec.backend, &mut body);
    body.out
}

struct Fold<'a, T> {
    weight_decay: Option<T>,
    beta3: T,
    s_weight: T,
    arrays: &'a [&'a [T]],
    out: (f64, f64),
}

impl<T: Element> Fold<'_, T> {
    /// Element `i`'s terms `(g·(p0 − p), |s'|)` folded into `acc`.
    ///
    /// # Safety
    /// `i + S::WIDTH` must be within every array.
    #[inline(always)]
    unsafe fn fold<S: Lanes<T>>(&self, s: S, (dot, abs): (S::V, S::V), i: usize) -> (S::V, S::V) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let at = |k: usize| self.arrays[k].as_ptr().add(i);
            let p = s.load(at(0));
            let mut g = s.load(at(1));
            if let Some(wd) = self.weight_decay {
                g = s.mul_add(p, s.splat(wd), g);
            }
            let origin = if self.arrays.len() == 4 {
                s.load(at(3))
            } else {
                s.splat(T::ZERO)
            };
            let s_next = s.mul_add(
                g,
                s.splat(self.s_weight),
                s.mul(s.load(at(2)), s.splat(self.beta3)),
            );
            (
                s.mul_add(g, s.sub(origin, p), dot),
                s.add(abs, s.abs(s_next)),
            )
        }
    }
}

impl<T: Element> WithLanes<T> for Fold<'_, T> {
    /// Element `i` into lane `i % 16` (vectors, then the scalar tail), then
    /// the lanes added in order in f64: the same on every backend.
    #[inline(always)]
    fn run<S: Lanes<T>>(&mut self, s: S) {
        let n = self.arrays[0].len();
        let per_group = VIRTUAL_LANES / S::WIDTH;
        let zero = (s.splat(T::ZERO), s.splat(T::ZERO));
        let mut acc = [zero; VIRTUAL_LANES];
        let full = n - n % VIRTUAL_LANES;
        let mut i = 0;
        while i < full {
            for (j, a) in acc.iter_mut().take(per_group).enumerate() {
                // SAFETY: i + VIRTUAL_LANES <= full <= n.
                *a = unsafe { self.fold(s, *a, i + j * S::WIDTH) };
            }
            i += VIRTUAL_LANES;
        }
        let mut lanes = [(T::ZERO, T::ZERO); VIRTUAL_LANES];
        let mut spill = [T::ZERO; VIRTUAL_LANES];
        for part in 0..2 {
            for (j, a) in acc.iter().take(per_group).enumerate() {
                let v = if part == 0 { a.0 } else { a.1 };
                // SAFETY: `spill` holds VIRTUAL_LANES = per_group * WIDTH elements.
                unsafe { s.store(spill.as_mut_ptr().add(j * S::WIDTH), v) };
            }
            for (lane, x) in lanes.iter_mut().zip(spill) {
                if part == 0 {
                    lane.0 = x
                } else {
                    lane.1 = x
                }
            }
        }
        while i < n {
            let k = i % VIRTUAL_LANES;
            // SAFETY: i < n; Scalar reads one element.
            lanes[k] = unsafe { self.fold(Scalar, lanes[k], i) };
            i += 1;
        }
        self.out = lanes.iter().fold((0.0, 0.0), |(d, a), (x, y)| {
            (d + x.to_f64(), a + y.to_f64())
        });
    }
}
