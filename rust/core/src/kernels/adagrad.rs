//! Adagrad (lr decay, weight decay, maximize) on dense gradients, operation
//! for operation as torch's `_single_tensor_adagrad` on its vectorised CPU path.

use super::decayed_grad;
use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::error::{Error, Result};
use crate::simd::Lanes;
use crate::tensors::ScalarState;

optimizer! {
    /// Adagrad hyper-parameters of one parameter group (`initial_accumulator_value`
    /// only fills the `sum` state torch creates).
    pub struct AdagradConfig = "adagrad" {
        lr: f64,
        lr_decay: f64,
        weight_decay: f64,
        eps: f64,
        maximize: bool,
    }
    state: ["sum"],
    scalars: ["step"],
}

impl PerElement for AdagradConfig {
    /// `clr = lr / (1 + (step - 1) * lr_decay)`.
    type Slot = f64;
    type Update<T: Element> = AdagradUpdate<T>;

    fn check_slot(&self, scalars: &ScalarState, slot: usize) -> Result<()> {
        match self.decay(scalars.incremented(slot, 0)) {
            0.0 => Err(Error::float_division_by_zero()),
            _ => Ok(()),
        }
    }

    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> f64 {
        let step = scalars.increment(slot, 0);
        self.lr / self.decay(step)
    }

    fn update<T: Element>(&self, clr: f64) -> AdagradUpdate<T> {
        AdagradUpdate {
            clr_neg: T::from_f64(-clr),
            eps: T::from_f64(self.eps),
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64(self.weight_decay)),
            maximize: self.maximize,
        }
    }
}

impl AdagradConfig {
    /// The divisor of `lr` at step `step`.
    fn decay(&self, step: f64) -> f64 {
        1.0 + (step - 1.0) * self.lr_decay
    }
}

pub(crate) struct AdagradUpdate<T> {
    clr_neg: T,
    eps: T,
    weight_decay: Option<T>,
    maximize: bool,
}

impl<T: Element> LaneUpdate<T> for AdagradUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, sum, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let p = s.load(param);
            let g = decayed_grad(s, p, s.load(grad), self.maximize, self.weight_decay);
            // state_sum.addcmul_(grad, grad, value=1)
            let acc = s.mul_add(g, g, s.load(sum));
            s.store(sum, acc);
            // std = state_sum.sqrt().add_(eps); param.addcdiv_(grad, std, value=-clr)
            let std = s.add(s.sqrt(acc), s.splat(self.eps));
            s.store(param, s.add(p, s.div(s.mul(s.splat(self.clr_neg), g), std)));
        }
    }
}
