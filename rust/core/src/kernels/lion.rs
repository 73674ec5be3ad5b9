//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"),
//! operation for operation as the reference package `lion-pytorch`'s
//! `update_fn`:
//!
//! ```text
//! p.mul_(1 - lr·wd)
//! p.add_(sign(exp_avg·β1 + (1 − β1)·g), alpha=-lr)
//! exp_avg.mul_(β2).add_(g, alpha=1 − β2)
//! ```

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// Lion hyper-parameters of one parameter group; `weight_decay` is the
/// factor the reference multiplies by `lr` (already divided by the initial
/// lr when its `decoupled_weight_decay` is set).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

impl Optimizer for LionConfig {
    const NAME: &'static str = "lion";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("betas", HyperKind::Pair),
        ("weight_decay", HyperKind::Float),
    ];
    const STATE: &'static [&'static str] = &["exp_avg"];
    const SCALARS: &'static [&'static str] = &[];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let (beta1, beta2) = h.pair("betas")?;
        Ok(LionConfig {
            lr: h.float("lr")?,
            beta1,
            beta2,
            weight_decay: h.float("weight_decay")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, _scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        engine::run(&LionKernel { config: self }, batch, exec);
        Ok(())
    }
}

struct LionKernel<'a> {
    config: &'a LionConfig,
}

impl Elementwise for LionKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 3);
        let mut block = LionBlock {
            // The reference computes `1 - lr * wd` in Python (f64), then multiplies.
            decay: T::from_f64(1.0 - c.lr * c.weight_decay),
            beta1: T::from_f64(c.beta1),
            one_minus_beta1: T::from_f64(1.0 - c.beta1),
            beta2: T::from_f64(c.beta2),
            one_minus_beta2: T::from_f64(1.0 - c.beta2),
            lr_neg: T::from_f64(-c.lr),
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            exp_avg: arrays[2].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct LionBlock<T> {
    decay: T,
    beta1: T,
    one_minus_beta1: T,
    beta2: T,
    one_minus_beta2: T,
    lr_neg: T,
    param: *mut T,
    grad: *const T,
    exp_avg: *mut T,
}

impl<T: Element> LaneBlock<T> for LionBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let g = s.load(self.grad.add(i));
            let m = s.load(self.exp_avg.add(i));
            // p.data.mul_(1 - lr * wd)
            let p = s.mul(s.load(self.param.add(i)), s.splat(self.decay));
            // exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sgn_()
            let direction = s.sign(s.mul_add(
                g,
                s.splat(self.one_minus_beta1),
                s.mul(m, s.splat(self.beta1)),
            ));
            // p.add_(update, alpha=-lr)
            s.store(
                self.param.add(i),
                s.mul_add(direction, s.splat(self.lr_neg), p),
            );
            // exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
            let m = s.mul_add(
                g,
                s.splat(self.one_minus_beta2),
                s.mul(m, s.splat(self.beta2)),
            );
            s.store(self.exp_avg.add(i), m);
        }
    }
}
