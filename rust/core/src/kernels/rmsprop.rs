//! RMSprop (centered, momentum, weight decay, maximize), operation for
//! operation as torch's `_single_tensor_rmsprop` on its vectorised CPU path.

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use super::{decayed_grad, Lerp};
use crate::dispatch::Element;
use crate::simd::Lanes;

optimizer! {
    /// RMSprop hyper-parameters of one parameter group.
    pub struct RmspropConfig = "rmsprop" {
        lr: f64,
        alpha: f64,
        eps: f64,
        weight_decay: f64,
        momentum: f64,
        centered: bool,
        maximize: bool,
    }
    // torch keeps a momentum buffer only when `momentum > 0`.
    state: ["square_avg", "momentum_buffer" if momentum > 0.0, "grad_avg" if centered],
    scalars: ["step"],
}

impl PerElement for RmspropConfig {
    type Slot = ();
    type Update<T: Element> = RmspropUpdate<T>;

    fn update<T: Element>(&self, _: ()) -> RmspropUpdate<T> {
        RmspropUpdate {
            lr_neg: T::from_f64(-self.lr),
            alpha: T::from_f64(self.alpha),
            one_minus_alpha: T::from_f64(1.0 - self.alpha),
            grad_avg_lerp: Lerp::new(1.0 - self.alpha),
            eps: T::from_f64(self.eps),
            momentum: (self.momentum > 0.0).then(|| T::from_f64(self.momentum)),
            centered: self.centered,
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64(self.weight_decay)),
            maximize: self.maximize,
        }
    }
}

pub(crate) struct RmspropUpdate<T> {
    lr_neg: T,
    alpha: T,
    one_minus_alpha: T,
    grad_avg_lerp: Lerp<T>,
    eps: T,
    /// With a momentum buffer.
    momentum: Option<T>,
    /// With `grad_avg`.
    centered: bool,
    weight_decay: Option<T>,
    maximize: bool,
}

impl<T: Element> LaneUpdate<T> for RmspropUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(
        &self,
        s: S,
        [param, grad, square_avg, momentum_buffer, grad_avg, ..]: Arrays<T>,
    ) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements; the
        // optional arrays are only touched when these settings use them.
        unsafe {
            let mut p = s.load(param);
            let g = decayed_grad(s, p, s.load(grad), self.maximize, self.weight_decay);
            // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
            let sq = s.mul(s.load(square_avg), s.splat(self.alpha));
            let sq = s.mul_add(s.mul(s.splat(self.one_minus_alpha), g), g, sq);
            s.store(square_avg, sq);
            let avg = if self.centered {
                // grad_avg.lerp_(grad, 1 - alpha); square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                let ga = self.grad_avg_lerp.apply(s, s.load(grad_avg), g);
                s.store(grad_avg, ga);
                s.sqrt(s.mul_add(s.mul(s.splat(-T::ONE), ga), ga, sq))
            } else {
                s.sqrt(sq)
            };
            let avg = s.add(avg, s.splat(self.eps));
            if let Some(momentum) = self.momentum {
                // buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
                let buf = s.mul(s.load(momentum_buffer), s.splat(momentum));
                let buf = s.add(buf, s.div(g, avg));
                s.store(momentum_buffer, buf);
                p = s.mul_add(buf, s.splat(self.lr_neg), p);
            } else {
                // param.addcdiv_(grad, avg, value=-lr)
                p = s.add(p, s.div(s.mul(s.splat(self.lr_neg), g), avg));
            }
            s.store(param, p);
        }
    }
}
