//! Adamax (the infinity-norm Adam) with weight decay and maximize, operation
//! for operation as torch's `_single_tensor_adamax` on its vectorised CPU path.

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use super::{decayed_grad, Lerp};
use crate::dispatch::Element;
use crate::error::{Error, Result};
use crate::simd::Lanes;
use crate::tensors::ScalarState;

optimizer! {
    /// Adamax hyper-parameters of one parameter group.
    pub struct AdamaxConfig = "adamax" {
        lr: f64,
        betas: (beta1, beta2),
        eps: f64,
        weight_decay: f64,
        maximize: bool,
    }
    state: ["exp_avg", "exp_inf"],
    scalars: ["step"],
}

impl PerElement for AdamaxConfig {
    /// `clr = lr / (1 - beta1 ** step)`, in f64 as torch computes it in Python.
    type Slot = f64;
    type Update<T: Element> = AdamaxUpdate<T>;

    /// torch's `lr / (1 - beta1 ** step)` raises (a zero divisor, a power out of range).
    fn check_slot(&self, scalars: &ScalarState, slot: usize) -> Result<()> {
        let step = scalars.incremented(slot, 0);
        Error::checked_py_div(self.lr, 1.0 - Error::checked_py_pow(self.beta1, step)?).map(drop)
    }

    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> f64 {
        let step = scalars.increment(slot, 0);
        self.lr / (1.0 - self.beta1.powf(step))
    }

    fn update<T: Element>(&self, clr: f64) -> AdamaxUpdate<T> {
        AdamaxUpdate {
            exp_avg_lerp: Lerp::new(1.0 - self.beta1),
            beta2: T::from_f64(self.beta2),
            eps: T::from_f64(self.eps),
            clr_neg: T::from_f64(-clr),
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64(self.weight_decay)),
            maximize: self.maximize,
        }
    }
}

pub(crate) struct AdamaxUpdate<T> {
    exp_avg_lerp: Lerp<T>,
    beta2: T,
    eps: T,
    clr_neg: T,
    weight_decay: Option<T>,
    maximize: bool,
}

impl<T: Element> LaneUpdate<T> for AdamaxUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, exp_avg, exp_inf, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let p = s.load(param);
            let g = decayed_grad(s, p, s.load(grad), self.maximize, self.weight_decay);
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = self.exp_avg_lerp.apply(s, s.load(exp_avg), g);
            s.store(exp_avg, m);
            // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
            let decayed = s.mul(s.load(exp_inf), s.splat(self.beta2));
            let u = s.max(decayed, s.add(s.abs(g), s.splat(self.eps)));
            s.store(exp_inf, u);
            // param.addcdiv_(exp_avg, exp_inf, value=-clr)
            s.store(param, s.add(p, s.div(s.mul(s.splat(self.clr_neg), m), u)));
        }
    }
}
