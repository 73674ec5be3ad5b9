//! NAdam (Nesterov Adam with momentum decay; coupled or decoupled weight
//! decay; maximize), operation for operation as torch's `_single_tensor_nadam`
//! on its vectorised CPU path, including its `mu_product` state.

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use super::{adam_settings, AdamMoments, Moments};
use crate::dispatch::Element;
use crate::error::{Error, Result};
use crate::simd::Lanes;
use crate::tensors::ScalarState;

optimizer! {
    /// NAdam hyper-parameters of one parameter group.
    pub struct NadamConfig = "nadam" {
        lr: f64,
        betas: (beta1, beta2),
        eps: f64,
        weight_decay: f64,
        momentum_decay: f64,
        decoupled_weight_decay: bool,
        maximize: bool,
    }
    state: ["exp_avg", "exp_avg_sq"],
    scalars: ["step", "mu_product"],
}

/// One parameter's step-dependent scalars, in f64 as torch computes them in Python.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotScalars {
    bias_correction2: f64,
    /// `-lr * (1 - mu) / (1 - mu_product)`: the gradient's weight.
    grad_weight: f64,
    /// `-lr * mu_next / (1 - mu_product * mu_next)`: the first moment's weight.
    exp_avg_weight: f64,
}

impl PerElement for NadamConfig {
    type Slot = SlotScalars;
    type Update<T: Element> = NadamUpdate<T>;

    /// torch's Python arithmetic raises, in its order: `beta2 ** step` and the two `0.96 ** ...`
    /// (out of range), then the divisors `1 - mu_product` and `1 - mu_product * mu_next` (zero).
    fn check_slot(&self, scalars: &ScalarState, slot: usize) -> Result<()> {
        let step = scalars.incremented(slot, 0);
        Error::checked_py_pow(self.beta2, step)?;
        let mu =
            self.beta1 * (1.0 - 0.5 * Error::checked_py_pow(0.96, step * self.momentum_decay)?);
        let mu_next = self.beta1
            * (1.0 - 0.5 * Error::checked_py_pow(0.96, (step + 1.0) * self.momentum_decay)?);
        let mu_product = scalars.scaled(slot, 1, mu);
        Error::checked_py_div(1.0, 1.0 - mu_product)?;
        Error::checked_py_div(1.0, 1.0 - mu_product * mu_next).map(drop)
    }

    /// Increments `step` and multiplies `mu_product` by this step's `mu` (both
    /// in their cells' dtype, as torch's in-place ops on 0-d tensors).
    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> SlotScalars {
        let step = scalars.increment(slot, 0);
        let mu = self.beta1 * (1.0 - 0.5 * 0.96f64.powf(step * self.momentum_decay));
        let mu_next = self.beta1 * (1.0 - 0.5 * 0.96f64.powf((step + 1.0) * self.momentum_decay));
        let mu_product = scalars.scale(slot, 1, mu);
        let mu_product_next = mu_product * mu_next;
        SlotScalars {
            bias_correction2: 1.0 - self.beta2.powf(step),
            grad_weight: -self.lr * (1.0 - mu) / (1.0 - mu_product),
            exp_avg_weight: (-self.lr * mu_next) / (1.0 - mu_product_next),
        }
    }

    fn update<T: Element>(&self, sc: SlotScalars) -> NadamUpdate<T> {
        NadamUpdate {
            moments: AdamMoments::new(adam_settings!(self)),
            bias_correction2: T::from_f64(sc.bias_correction2),
            eps: T::from_f64(self.eps),
            grad_weight: T::from_f64(sc.grad_weight),
            exp_avg_weight: T::from_f64(sc.exp_avg_weight),
        }
    }
}

pub(crate) struct NadamUpdate<T> {
    moments: AdamMoments<T>,
    bias_correction2: T,
    eps: T,
    grad_weight: T,
    exp_avg_weight: T,
}

impl<T: Element> LaneUpdate<T> for NadamUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, arrays: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let Moments {
                param: mut p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
            } = self.moments.update(s, arrays);
            // denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
            let denom = s.add(
                s.sqrt(s.div(v, s.splat(self.bias_correction2))),
                s.splat(self.eps),
            );
            // param.addcdiv_(grad, denom, value=...); param.addcdiv_(exp_avg, denom, value=...)
            p = s.add(p, s.div(s.mul(s.splat(self.grad_weight), g), denom));
            p = s.add(p, s.div(s.mul(s.splat(self.exp_avg_weight), m), denom));
            s.store(arrays[0], p);
        }
    }
}
