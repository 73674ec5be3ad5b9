//! Adadelta (weight decay, maximize), operation for operation as torch's
//! `_single_tensor_adadelta` on its vectorised CPU path.

use super::decayed_grad;
use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::simd::Lanes;

optimizer! {
    /// Adadelta hyper-parameters of one parameter group.
    pub struct AdadeltaConfig = "adadelta" {
        lr: f64,
        rho: f64,
        eps: f64,
        weight_decay: f64,
        maximize: bool,
    }
    state: ["square_avg", "acc_delta"],
    scalars: ["step"],
}

impl PerElement for AdadeltaConfig {
    type Slot = ();
    type Update<T: Element> = AdadeltaUpdate<T>;

    fn update<T: Element>(&self, _: ()) -> AdadeltaUpdate<T> {
        AdadeltaUpdate {
            lr_neg: T::from_f64(-self.lr),
            rho: T::from_f64(self.rho),
            one_minus_rho: T::from_f64(1.0 - self.rho),
            eps: T::from_f64(self.eps),
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64(self.weight_decay)),
            maximize: self.maximize,
        }
    }
}

pub(crate) struct AdadeltaUpdate<T> {
    lr_neg: T,
    rho: T,
    one_minus_rho: T,
    eps: T,
    weight_decay: Option<T>,
    maximize: bool,
}

impl<T: Element> LaneUpdate<T> for AdadeltaUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, square_avg, acc_delta, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let p = s.load(param);
            let g = decayed_grad(s, p, s.load(grad), self.maximize, self.weight_decay);
            let (rho, one_minus_rho) = (s.splat(self.rho), s.splat(self.one_minus_rho));
            // square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
            let sq = s.mul(s.load(square_avg), rho);
            let sq = s.mul_add(s.mul(one_minus_rho, g), g, sq);
            s.store(square_avg, sq);
            // std = square_avg.add(eps).sqrt_(); delta = acc_delta.add(eps).sqrt_()
            let std = s.sqrt(s.add(sq, s.splat(self.eps)));
            let acc = s.load(acc_delta);
            let delta = s.sqrt(s.add(acc, s.splat(self.eps)));
            // delta.div_(std).mul_(grad)
            let delta = s.mul(s.div(delta, std), g);
            // acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
            let acc = s.mul_add(s.mul(one_minus_rho, delta), delta, s.mul(acc, rho));
            s.store(acc_delta, acc);
            // param.add_(delta, alpha=-lr)
            s.store(param, s.mul_add(delta, s.splat(self.lr_neg), p));
        }
    }
}
