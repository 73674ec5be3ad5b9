//! SGD with momentum, dampening, Nesterov, weight decay and maximize,
//! operation for operation as torch's `_single_tensor_sgd`.

use super::declare::{self, optimizer, Arrays, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::engine::Exec;
use crate::error::{Error, Result};
use crate::optimizer::Optimizer;
use crate::simd::Lanes;
use crate::storage::{LaneArray, ParamArray};
use crate::tensors::TensorBatch;

optimizer! {
    /// SGD hyper-parameters of one parameter group.
    pub struct SgdConfig = "sgd" {
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
        maximize: bool,
    }
    // The momentum buffer exists when momentum is on. Through the table it
    // must exist already: torch creates it on a parameter's first step (as
    // the gradient itself), which stays torch's to run.
    state: ["momentum_buffer" if momentum != 0.0],
    scalars: [],
}

impl SgdConfig {
    /// Arrays per tensor slot: `[param, grad]`, plus the momentum buffer when momentum is on.
    pub fn arity(&self) -> usize {
        2 + self.state_keys().len()
    }
}

/// One SGD step over a batch of `[param, grad(, momentum_buffer)]` slots.
///
/// `fresh[i]` marks a momentum buffer created this step: torch initialises it
/// to the (decayed) gradient instead of blending.
pub fn sgd_step(config: &SgdConfig, batch: &TensorBatch, fresh: &[bool], exec: Exec) -> Result<()> {
    if batch.arity() != config.arity() {
        return Err(Error::Mismatch(format!(
            "SGD expects {} arrays per tensor, got {}",
            config.arity(),
            batch.arity()
        )));
    }
    if config.momentum != 0.0 && fresh.len() != batch.slots() {
        return Err(Error::Mismatch(format!(
            "{} fresh flags for {} tensors",
            fresh.len(),
            batch.slots()
        )));
    }
    let fresh: Vec<bool> = (0..batch.slots())
        .map(|i| config.momentum != 0.0 && fresh[i])
        .collect();
    declare::run(config, &fresh, batch, exec);
    Ok(())
}

impl PerElement for SgdConfig {
    /// Whether the momentum buffer was created this step.
    type Slot = bool;
    type Update<T: Element> = SgdUpdate<T>;

    fn update<T: Element>(&self, fresh: bool) -> SgdUpdate<T> {
        SgdUpdate {
            lr_neg: T::from_f64(-self.lr),
            momentum: T::from_f64(self.momentum),
            blend: T::from_f64(1.0 - self.dampening),
            weight_decay: T::from_f64(self.weight_decay),
            use_weight_decay: self.weight_decay != 0.0,
            use_momentum: self.momentum != 0.0,
            fresh,
            nesterov: self.nesterov,
            maximize: self.maximize,
        }
    }
}

pub(crate) struct SgdUpdate<T> {
    lr_neg: T,
    momentum: T,
    blend: T,
    weight_decay: T,
    use_weight_decay: bool,
    use_momentum: bool,
    fresh: bool,
    nesterov: bool,
    maximize: bool,
}

impl<T: Element> SgdUpdate<T> {
    /// The update of `S::WIDTH` elements at `i` of arrays of any [`crate::storage`] types
    /// (raw pointers here, widened or dequantised copies in the 8-bit kernel).
    ///
    /// # Safety
    /// `param`, `grad` and, when momentum is on, `buf` are valid for `i..i + S::WIDTH`.
    #[inline(always)]
    pub(crate) unsafe fn apply_at<
        S: Lanes<T>,
        P: ParamArray<T>,
        G: LaneArray<T>,
        B: LaneArray<T>,
    >(
        &self,
        s: S,
        (param, grad, buf): (P, G, B),
        i: usize,
    ) {
        // SAFETY: forwarded to the caller; `buf` is only touched when momentum is on.
        unsafe {
            let mut p = param.load(s, i);
            let mut g = grad.load(s, i);
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE)); // exact negation, -0 included
            }
            if self.use_weight_decay {
                g = s.mul_add(p, s.splat(self.weight_decay), g);
            }
            if self.use_momentum {
                let b = if self.fresh {
                    g
                } else {
                    let decayed = s.mul(buf.load(s, i), s.splat(self.momentum));
                    s.mul_add(g, s.splat(self.blend), decayed)
                };
                buf.store(s, i, b);
                g = if self.nesterov {
                    s.mul_add(b, s.splat(self.momentum), g)
                } else {
                    b
                };
            }
            p = s.mul_add(g, s.splat(self.lr_neg), p);
            param.store_param(s, i, p);
        }
    }
}

impl<T: Element> LaneUpdate<T> for SgdUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&self, s: S, [param, grad, buf, ..]: Arrays<T>) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements; `buf`
        // is a full array when momentum is on.
        unsafe { self.apply_at(s, (param, grad, buf), 0) }
    }
}
