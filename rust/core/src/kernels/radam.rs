//! RAdam (rectified Adam; coupled or decoupled weight decay; maximize),
//! operation for operation as torch's `_single_tensor_radam` on its
//! vectorised CPU path.

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use super::{adam_settings, AdamMoments, Moments};
use crate::dispatch::Element;
use crate::error::{Error, Result};
use crate::simd::Lanes;
use crate::tensors::ScalarState;

optimizer! {
    /// RAdam hyper-parameters of one parameter group.
    pub struct RadamConfig = "radam" {
        lr: f64,
        betas: (beta1, beta2),
        eps: f64,
        weight_decay: f64,
        decoupled_weight_decay: bool,
        maximize: bool,
    }
    state: ["exp_avg", "exp_avg_sq"],
    scalars: ["step"],
}

/// One parameter's step-dependent scalars, in f64 as torch computes them in Python.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rectification {
    bias_correction1: f64,
    bias_correction2_sqrt: f64,
    /// The variance rectification term, when the approximated SMA is long enough (`rho_t > 5`).
    rect: Option<f64>,
}

impl PerElement for RadamConfig {
    type Slot = Rectification;
    type Update<T: Element> = RadamUpdate<T>;

    /// torch's Python arithmetic raises, in its order: `beta1 ** step`, `beta2 ** step` (out of
    /// range), `2 / (1 - beta2)`, then `... / bias_correction2` (a zero divisor).
    fn check_slot(&self, scalars: &ScalarState, slot: usize) -> Result<()> {
        let step = scalars.incremented(slot, 0);
        Error::checked_py_pow(self.beta1, step)?;
        let bias_correction2 = 1.0 - Error::checked_py_pow(self.beta2, step)?;
        Error::checked_py_div(2.0, 1.0 - self.beta2)?;
        Error::checked_py_div(1.0, bias_correction2).map(drop)
    }

    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> Rectification {
        let step = scalars.increment(slot, 0);
        let bias_correction1 = 1.0 - self.beta1.powf(step);
        let bias_correction2 = 1.0 - self.beta2.powf(step);
        let rho_inf = 2.0 / (1.0 - self.beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * self.beta2.powf(step) / bias_correction2;
        let rect = (rho_t > 5.0).then(|| {
            super::py_pow_half(
                (rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                    / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t),
            )
        });
        Rectification {
            bias_correction1,
            bias_correction2_sqrt: super::py_pow_half(bias_correction2),
            rect,
        }
    }

    fn update<T: Element>(&self, r: Rectification) -> RadamUpdate<T> {
        RadamUpdate {
            moments: AdamMoments::new(adam_settings!(self)),
            bias_correction1: T::from_f64(r.bias_correction1),
            bias_correction2_sqrt: T::from_f64(r.bias_correction2_sqrt),
            rect: r.rect.map(T::from_f64),
            lr: T::from_f64(self.lr),
            eps: T::from_f64(self.eps),
        }
    }
}

pub(crate) struct RadamUpdate<T> {
    moments: AdamMoments<T>,
    bias_correction1: T,
    bias_correction2_sqrt: T,
    rect: Option<T>,
    lr: T,
    eps: T,
}

impl<T: Element> LaneUpdate<T> for RadamUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, arrays: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let Moments {
                param: p,
                exp_avg: m,
                exp_avg_sq: v,
                ..
            } = self.moments.update(s, arrays);
            // bias_corrected_exp_avg * lr (* adaptive_lr * rect when rectified)
            let mut update = s.mul(s.div(m, s.splat(self.bias_correction1)), s.splat(self.lr));
            if let Some(rect) = self.rect {
                // adaptive_lr = bias_correction2 ** 0.5 / (exp_avg_sq.sqrt() + eps),
                // which torch evaluates as (...).reciprocal() * bias_correction2 ** 0.5.
                let denom = s.add(s.sqrt(v), s.splat(self.eps));
                let adaptive = s.mul(
                    s.div(s.splat(T::ONE), denom),
                    s.splat(self.bias_correction2_sqrt),
                );
                update = s.mul(s.mul(update, adaptive), s.splat(rect));
            }
            // param.add_(update, alpha=-1.0)
            s.store(arrays[0], s.sub(p, update));
        }
    }
}
