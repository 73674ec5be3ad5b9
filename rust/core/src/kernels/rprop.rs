//! Rprop (resilient backpropagation, maximize), operation for operation as
//! torch's `_single_tensor_rprop` on its vectorised CPU path.

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::simd::Lanes;

optimizer! {
    /// Rprop hyper-parameters of one parameter group (`lr` only fills the
    /// `step_size` state torch creates).
    pub struct RpropConfig = "rprop" {
        etas: (etaminus, etaplus),
        step_sizes: (step_size_min, step_size_max),
        maximize: bool,
    }
    state: ["prev", "step_size"],
    scalars: ["step"],
}

impl PerElement for RpropConfig {
    type Slot = ();
    type Update<T: Element> = RpropUpdate<T>;

    fn update<T: Element>(&self, _: ()) -> RpropUpdate<T> {
        RpropUpdate {
            etaminus: T::from_f64(self.etaminus),
            etaplus: T::from_f64(self.etaplus),
            step_size_min: T::from_f64(self.step_size_min),
            step_size_max: T::from_f64(self.step_size_max),
            maximize: self.maximize,
        }
    }
}

pub(crate) struct RpropUpdate<T> {
    etaminus: T,
    etaplus: T,
    step_size_min: T,
    step_size_max: T,
    maximize: bool,
}

impl<T: Element> LaneUpdate<T> for RpropUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, prev, step_size, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let mut g = s.load(grad);
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE));
            }
            let (zero, one) = (s.splat(T::ZERO), s.splat(T::ONE));
            let (etaminus, etaplus) = (s.splat(self.etaminus), s.splat(self.etaplus));
            // sign = grad.mul(prev).sign(), then etaplus where > 0, etaminus where < 0, 1 where 0
            // (torch's sign of NaN is 0).
            let prod = s.mul(g, s.load(prev));
            let factor = s.lt_select(zero, prod, etaplus, s.lt_select(prod, zero, etaminus, one));
            // step_size.mul_(sign).clamp_(step_size_min, step_size_max), NaN kept.
            let size = s.mul(s.load(step_size), factor);
            let lo = s.splat(self.step_size_min);
            let hi = s.splat(self.step_size_max);
            let size = s.lt_select(size, lo, lo, size);
            let size = s.lt_select(hi, size, hi, size);
            s.store(step_size, size);
            // grad[sign.eq(etaminus)] = 0: g where factor < etaminus or etaminus < factor, else 0.
            let g = s.lt_select(factor, etaminus, g, s.lt_select(etaminus, factor, g, zero));
            // param.addcmul_(grad.sign(), step_size, value=-1); prev.copy_(grad)
            let p = s.load(param);
            s.store(
                param,
                s.mul_add(s.mul(s.splat(-T::ONE), s.sign(g)), size, p),
            );
            s.store(prev, g);
        }
    }
}
