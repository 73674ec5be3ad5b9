//! NAdam (Nesterov Adam with momentum decay; coupled or decoupled weight
//! decay; maximize), operation for operation as torch's `_single_tensor_nadam`
//! on its vectorised CPU path, including its `mu_product` state.

use super::{common_len, AdamMoments, AdamSettings, Moments};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// NAdam hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NadamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum_decay: f64,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
}

impl Optimizer for NadamConfig {
    const NAME: &'static str = "nadam";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("betas", HyperKind::Pair),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("momentum_decay", HyperKind::Float),
        ("decoupled_weight_decay", HyperKind::Flag),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];
    const SCALARS: &'static [&'static str] = &["step", "mu_product"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let (beta1, beta2) = h.pair("betas")?;
        Ok(NadamConfig {
            lr: h.float("lr")?,
            beta1,
            beta2,
            eps: h.float("eps")?,
            weight_decay: h.float("weight_decay")?,
            momentum_decay: h.float("momentum_decay")?,
            decoupled_weight_decay: h.flag("decoupled_weight_decay")?,
            maximize: h.flag("maximize")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        let per_slot: Vec<SlotScalars> = (0..batch.slots())
            .map(|slot| SlotScalars::advance(self, scalars, slot))
            .collect();
        engine::run(
            &NadamKernel {
                config: self,
                per_slot: &per_slot,
            },
            batch,
            exec,
        );
        Ok(())
    }
}

/// One parameter's step-dependent scalars, in f64 as torch computes them in Python.
#[derive(Clone, Copy, Debug)]
struct SlotScalars {
    bias_correction2: f64,
    /// `-lr * (1 - mu) / (1 - mu_product)`: the gradient's weight.
    grad_weight: f64,
    /// `-lr * mu_next / (1 - mu_product * mu_next)`: the first moment's weight.
    exp_avg_weight: f64,
}

impl SlotScalars {
    /// Increments `step` and multiplies `mu_product` by this step's `mu` (both
    /// in their cells' dtype, as torch's in-place ops on 0-d tensors).
    fn advance(c: &NadamConfig, scalars: &mut ScalarState, slot: usize) -> SlotScalars {
        let step = scalars.increment(slot, 0);
        let mu = c.beta1 * (1.0 - 0.5 * 0.96f64.powf(step * c.momentum_decay));
        let mu_next = c.beta1 * (1.0 - 0.5 * 0.96f64.powf((step + 1.0) * c.momentum_decay));
        let mu_product = scalars.scale(slot, 1, mu);
        let mu_product_next = mu_product * mu_next;
        SlotScalars {
            bias_correction2: 1.0 - c.beta2.powf(step),
            grad_weight: -c.lr * (1.0 - mu) / (1.0 - mu_product),
            exp_avg_weight: (-c.lr * mu_next) / (1.0 - mu_product_next),
        }
    }
}

struct NadamKernel<'a> {
    config: &'a NadamConfig,
    per_slot: &'a [SlotScalars],
}

impl Elementwise for NadamKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 4);
        let sc = self.per_slot[slot];
        let mut block = NadamBlock {
            moments: AdamMoments::new(AdamSettings {
                beta1: c.beta1,
                beta2: c.beta2,
                lr: c.lr,
                weight_decay: c.weight_decay,
                decoupled_weight_decay: c.decoupled_weight_decay,
                maximize: c.maximize,
            }),
            bias_correction2: T::from_f64(sc.bias_correction2),
            eps: T::from_f64(c.eps),
            grad_weight: T::from_f64(sc.grad_weight),
            exp_avg_weight: T::from_f64(sc.exp_avg_weight),
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            exp_avg: arrays[2].as_mut_ptr(),
            exp_avg_sq: arrays[3].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct NadamBlock<T> {
    moments: AdamMoments<T>,
    bias_correction2: T,
    eps: T,
    grad_weight: T,
    exp_avg_weight: T,
    param: *mut T,
    grad: *const T,
    exp_avg: *mut T,
    exp_avg_sq: *mut T,
}

impl<T: Element> LaneBlock<T> for NadamBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let Moments {
                param: mut p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
            } = self.moments.update(
                s,
                self.param.add(i),
                self.grad.add(i),
                self.exp_avg.add(i),
                self.exp_avg_sq.add(i),
            );
            // denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
            let denom = s.add(
                s.sqrt(s.div(v, s.splat(self.bias_correction2))),
                s.splat(self.eps),
            );
            // param.addcdiv_(grad, denom, value=...); param.addcdiv_(exp_avg, denom, value=...)
            p = s.add(p, s.div(s.mul(s.splat(self.grad_weight), g), denom));
            p = s.add(p, s.div(s.mul(s.splat(self.exp_avg_weight), m), denom));
            s.store(self.param.add(i), p);
        }
    }
}
