//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"),
//! operation for operation as the reference package `lion-pytorch`'s
//! `update_fn`:
//!
//! ```text
//! p.mul_(1 - lr·wd)
//! p.add_(sign(exp_avg·β1 + (1 − β1)·g), alpha=-lr)
//! exp_avg.mul_(β2).add_(g, alpha=1 − β2)
//! ```

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::simd::Lanes;

optimizer! {
    /// Lion hyper-parameters of one parameter group; `weight_decay` is the
    /// factor the reference multiplies by `lr` (already divided by the initial
    /// lr when its `decoupled_weight_decay` is set).
    pub struct LionConfig = "lion" {
        lr: f64,
        betas: (beta1, beta2),
        weight_decay: f64,
    }
    state: ["exp_avg"],
    scalars: [],
}

impl PerElement for LionConfig {
    type Slot = ();
    type Update<T: Element> = LionUpdate<T>;

    fn update<T: Element>(&self, _: ()) -> LionUpdate<T> {
        LionUpdate {
            // The reference computes `1 - lr * wd` in Python (f64), then multiplies.
            decay: T::from_f64(1.0 - self.lr * self.weight_decay),
            beta1: T::from_f64(self.beta1),
            one_minus_beta1: T::from_f64(1.0 - self.beta1),
            beta2: T::from_f64(self.beta2),
            one_minus_beta2: T::from_f64(1.0 - self.beta2),
            lr_neg: T::from_f64(-self.lr),
        }
    }
}

pub(crate) struct LionUpdate<T> {
    decay: T,
    beta1: T,
    one_minus_beta1: T,
    beta2: T,
    one_minus_beta2: T,
    lr_neg: T,
}

impl<T: Element> LaneUpdate<T> for LionUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, exp_avg, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let g = s.load(grad);
            let m = s.load(exp_avg);
            // p.data.mul_(1 - lr * wd)
            let p = s.mul(s.load(param), s.splat(self.decay));
            // exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sgn_()
            let direction = s.sign(s.mul_add(
                g,
                s.splat(self.one_minus_beta1),
                s.mul(m, s.splat(self.beta1)),
            ));
            // p.add_(update, alpha=-lr)
            s.store(param, s.mul_add(direction, s.splat(self.lr_neg), p));
            // exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
            let m = s.mul_add(
                g,
                s.splat(self.one_minus_beta2),
                s.mul(m, s.splat(self.beta2)),
            );
            s.store(exp_avg, m);
        }
    }
}
