//! Schedule-Free AdamW and SGD (Defazio et al. 2024, "The Road Less
//! Scheduled"), operation for operation as the reference package
//! `schedulefree`'s for-loop paths. The parameter holds y, the point the
//! gradient is taken at; state `z` is the base iterate. The group-level
//! schedule (warm-up, the averaging weight `ckp1`, the bias correction) is
//! computed by the caller, as the reference does in Python, and arrives as
//! hyper-parameters.
//!
//! ```text
//! AdamW:  v ← β2·v + (1 − β2)·g²;  d = g / (sqrt(v / bc2) + eps) + wd·y
//! SGD:    d = g + wd·y
//! both:   y ← lerp(y, z, ckp1);  y ← y + lr·(β1·(1 − ckp1) − 1)·d;  z ← z − lr·d
//! ```

use super::declare::{optimizer, Arrays, LaneUpdate, PerElement};
use super::{Lerp, SecondMoment};
use crate::dispatch::Element;
use crate::simd::Lanes;

/// The per-step coefficients both variants share, from the scheduled `lr`,
/// β1 (AdamW) or `momentum` (SGD), the weight `ckp1` of this step's z in the
/// running average of the iterates, and the weight decay.
#[derive(Clone, Copy)]
pub(crate) struct Coefficients<T> {
    towards_z: Lerp<T>,
    y_step: T,
    z_step: T,
    weight_decay: Option<T>,
}

impl<T: Element> Coefficients<T> {
    fn new(lr: f64, beta1: f64, ckp1: f64, weight_decay: f64) -> Coefficients<T> {
        Coefficients {
            towards_z: Lerp::new(ckp1),
            // alpha=lr*(beta1*(1-ckp1)-1), in f64 as the reference computes it in Python.
            y_step: T::from_f64(lr * (beta1 * (1.0 - ckp1) - 1.0)),
            z_step: T::from_f64(-lr),
            weight_decay: (weight_decay != 0.0).then(|| T::from_f64(weight_decay)),
        }
    }

    /// Decays the direction at y, then moves y and z; returns nothing, stores both.
    #[inline(always)]
    unsafe fn move_y_and_z<S: Lanes<T>>(&self, s: S, y: *mut T, z: *mut T, mut d: S::V) {
        // SAFETY: the caller's index is within both arrays.
        unsafe {
            let y_now = s.load(y);
            if let Some(wd) = self.weight_decay {
                // grad.add_(y, alpha=weight_decay)
                d = s.mul_add(y_now, s.splat(wd), d);
            }
            let z_now = s.load(z);
            // y.lerp_(end=z, weight=ckp1); y.add_(d, alpha=lr*(beta1*(1-ckp1)-1))
            let y_new = s.mul_add(
                d,
                s.splat(self.y_step),
                self.towards_z.apply(s, y_now, z_now),
            );
            s.store(y, y_new);
            // z.sub_(d, alpha=lr)
            s.store(z, s.mul_add(d, s.splat(self.z_step), z_now));
        }
    }
}

optimizer! {
    /// Schedule-Free AdamW settings of one group for one step (`lr` after warm-up).
    pub struct AdamwScheduleFreeConfig = "adamw_schedulefree" {
        lr: f64,
        betas: (beta1, beta2),
        eps: f64,
        weight_decay: f64,
        ckp1: f64,
        bias_correction2: f64,
    }
    state: ["z", "exp_avg_sq"],
    scalars: [],
}

impl PerElement for AdamwScheduleFreeConfig {
    type Slot = ();
    type Update<T: Element> = AdamwScheduleFreeUpdate<T>;

    fn update<T: Element>(&self, _: ()) -> AdamwScheduleFreeUpdate<T> {
        AdamwScheduleFreeUpdate {
            moves: Coefficients::new(self.lr, self.beta1, self.ckp1, self.weight_decay),
            second_moment: SecondMoment::new(self.beta2),
            bias_correction2: T::from_f64(self.bias_correction2),
            eps: T::from_f64(self.eps),
        }
    }
}

pub(crate) struct AdamwScheduleFreeUpdate<T> {
    moves: Coefficients<T>,
    second_moment: SecondMoment<T>,
    bias_correction2: T,
    eps: T,
}

impl<T: Element> LaneUpdate<T> for AdamwScheduleFreeUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [y, grad, z, exp_avg_sq, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe {
            let g = s.load(grad);
            let v = self.second_moment.update(s, exp_avg_sq, g);
            // denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps); grad.div_(denom)
            let denom = s.add(
                s.sqrt(s.div(v, s.splat(self.bias_correction2))),
                s.splat(self.eps),
            );
            self.moves.move_y_and_z(s, y, z, s.div(g, denom));
        }
    }
}

optimizer! {
    /// Schedule-Free SGD settings of one group for one step (`lr` after warm-up).
    pub struct SgdScheduleFreeConfig = "sgd_schedulefree" {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        ckp1: f64,
    }
    state: ["z"],
    scalars: [],
}

impl PerElement for SgdScheduleFreeConfig {
    type Slot = ();
    type Update<T: Element> = Coefficients<T>;

    fn update<T: Element>(&self, _: ()) -> Coefficients<T> {
        Coefficients::new(self.lr, self.momentum, self.ckp1, self.weight_decay)
    }
}

/// Schedule-Free SGD's whole update: the gradient is the direction.
impl<T: Element> LaneUpdate<T> for Coefficients<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [y, grad, z, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements.
        unsafe { self.move_y_and_z(s, y, z, s.load(grad)) }
    }
}
