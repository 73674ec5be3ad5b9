//! Averaged SGD (weight decay, maximize), operation for operation as torch's
//! `_single_tensor_asgd` on its vectorised CPU path, with its per-parameter
//! `eta` and `mu` kept in their 0-d tensors as torch keeps them.

use super::decayed_grad;
use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::error::{Error, Result};
use crate::simd::Lanes;
use crate::tensors::ScalarState;

optimizer! {
    /// ASGD hyper-parameters of one parameter group.
    pub struct AsgdConfig = "asgd" {
        lr: f64,
        lambd: f64,
        alpha: f64,
        t0: f64,
        weight_decay: f64,
        maximize: bool,
        /// torch stores each new `eta`/`mu` through `torch.as_tensor(float)`, so
        /// they are rounded to the default dtype before the cell's own dtype.
        default_float32: bool,
    }
    state: ["ax"],
    scalars: ["step", "eta", "mu"],
}

impl PerElement for AsgdConfig {
    /// This step's `(eta, mu)`.
    type Slot = (f64, f64);
    type Update<T: Element> = AsgdUpdate<T>;

    /// The update uses this step's `eta` and `mu` as stored; the values for
    /// the next step are then computed from the new step count.
    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> (f64, f64) {
        let step = scalars.increment(slot, 0);
        let (eta, mu) = (scalars.get(slot, 1), scalars.get(slot, 2));
        let stored = |v: f64| {
            if self.default_float32 {
                v as f32 as f64
            } else {
                v
            }
        };
        let new_eta = self.lr / self.eta_divisor(step);
        scalars.set(slot, 1, stored(new_eta));
        scalars.set(slot, 2, stored(1.0 / (step - self.t0).max(1.0)));
        (eta, mu)
    }

    fn check_slot(&self, scalars: &ScalarState, slot: usize) -> Result<()> {
        let base = 1.0 + self.lambd * self.lr * scalars.incremented(slot, 0);
        let divisor = self.eta_divisor(scalars.incremented(slot, 0));
        if base == 0.0 && self.alpha < 0.0 {
            Err(Error::zero_to_negative_power())
        } else if divisor.is_infinite() && base.is_finite() && self.alpha.is_finite() {
            // CPython's float `**` refuses a finite result it cannot represent.
            Err(Error::power_out_of_range())
        } else if divisor == 0.0 {
            Err(Error::float_division_by_zero())
        } else {
            Ok(())
        }
    }

    fn update<T: Element>(&self, (eta, mu): (f64, f64)) -> AsgdUpdate<T> {
        AsgdUpdate {
            param_decay: T::from_f64(1.0 - self.lambd * eta),
            eta_neg: T::from_f64(-eta),
            // torch copies the parameter while `mu.item() == 1`.
            mu: (mu != 1.0).then(|| T::from_f64(mu)),
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64(self.weight_decay)),
            maximize: self.maximize,
        }
    }
}

impl AsgdConfig {
    /// `(1 + lambd * lr * step) ** alpha`, the divisor of `lr` in the next `eta`.
    fn eta_divisor(&self, step: f64) -> f64 {
        (1.0 + self.lambd * self.lr * step).powf(self.alpha)
    }
}

pub(crate) struct AsgdUpdate<T> {
    param_decay: T,
    eta_neg: T,
    mu: Option<T>,
    weight_decay: Option<T>,
    maximize: bool,
}

impl<T: Element> LaneUpdate<T> for AsgdUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, ax, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let p = s.load(param);
            let g = decayed_grad(s, p, s.load(grad), self.maximize, self.weight_decay);
            // param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta)
            let p = s.mul_add(
                g,
                s.splat(self.eta_neg),
                s.mul(p, s.splat(self.param_decay)),
            );
            s.store(param, p);
            // ax.add_(param.sub(ax).mul_(mu)), or ax.copy_(param)
            let average = match self.mu {
                Some(mu) => {
                    let a = s.load(ax);
                    s.add(a, s.mul(s.sub(p, a), s.splat(mu)))
                }
                None => p,
            };
            s.store(ax, average);
        }
    }
}
