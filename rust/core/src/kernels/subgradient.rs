//! The subgradient method: θ ← θ − step·(±g + l1·sign(θ) + weight_decay·θ).
//!
//! `step` is the whole scalar step of this iteration (the step rule's αₜ
//! times any normalisation), computed by the caller; the update itself is a
//! single fused pass over `[param, grad]`.

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::{Error, Result};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::TensorBatch;

/// One subgradient step's scalars for a parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SubgradientConfig {
    /// αₜ (times 1/‖d‖ when normalising).
    pub step: f64,
    /// Coefficient of the ‖θ‖₁ term; adds `l1·sign(θ)` to the direction.
    pub l1: f64,
    /// Coefficient of the ½‖θ‖² term; adds `weight_decay·θ` to the direction.
    pub weight_decay: f64,
    /// Ascend the loss (the gradient's sign is flipped; the penalties are not).
    pub maximize: bool,
}

/// One subgradient step over a batch of `[param, grad]` slots.
pub fn subgradient_step(config: &SubgradientConfig, batch: &TensorBatch, exec: Exec) -> Result<()> {
    if batch.arity() != 2 {
        return Err(Error::Mismatch(format!(
            "the subgradient step expects 2 arrays per tensor, got {}",
            batch.arity()
        )));
    }
    for (name, v) in [
        ("step", config.step),
        ("l1", config.l1),
        ("weight_decay", config.weight_decay),
    ] {
        if !v.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "{name} must be finite, got {v}"
            )));
        }
    }
    engine::run(&SubgradientKernel { config }, batch, exec);
    Ok(())
}

struct SubgradientKernel<'a> {
    config: &'a SubgradientConfig,
}

impl Elementwise for SubgradientKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 2);
        let mut block = SubgradientBlock {
            step_neg: T::from_f64(-c.step),
            l1: T::from_f64(c.l1),
            weight_decay: T::from_f64(c.weight_decay),
            use_l1: c.l1 != 0.0,
            use_weight_decay: c.weight_decay != 0.0,
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
        };
        // SAFETY: both arrays hold `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }

    fn writes(&self, k: usize) -> bool {
        k == 0
    }
}

/// The direction `±g + weight_decay·θ + l1·sign(θ)`, in that order of
/// operations (shared with the direction-norm reduction).
#[inline(always)]
pub(crate) fn direction<T: Element, S: Lanes<T>>(
    s: S,
    p: S::V,
    mut g: S::V,
    maximize: bool,
    weight_decay: Option<T>,
    l1: Option<T>,
) -> S::V {
    if maximize {
        g = s.mul(g, s.splat(-T::ONE));
    }
    if let Some(wd) = weight_decay {
        g = s.mul_add(p, s.splat(wd), g);
    }
    if let Some(l1) = l1 {
        g = s.mul_add(s.sign(p), s.splat(l1), g);
    }
    g
}

struct SubgradientBlock<T> {
    step_neg: T,
    l1: T,
    weight_decay: T,
    use_l1: bool,
    use_weight_decay: bool,
    maximize: bool,
    param: *mut T,
    grad: *const T,
}

impl<T: Element> LaneBlock<T> for SubgradientBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within both arrays.
        unsafe {
            let p = s.load(self.param.add(i));
            let g = s.load(self.grad.add(i));
            let d = direction(
                s,
                p,
                g,
                self.maximize,
                self.use_weight_decay.then_some(self.weight_decay),
                self.use_l1.then_some(self.l1),
            );
            s.store(self.param.add(i), s.mul_add(d, s.splat(self.step_neg), p));
        }
    }
}
