//! Adadelta (weight decay, maximize), operation for operation as torch's
//! `_single_tensor_adadelta` on its vectorised CPU path.

use super::{common_len, decayed_grad};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// Adadelta hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdadeltaConfig {
    pub lr: f64,
    pub rho: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Optimizer for AdadeltaConfig {
    const NAME: &'static str = "adadelta";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("rho", HyperKind::Float),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["square_avg", "acc_delta"];
    const SCALARS: &'static [&'static str] = &["step"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        Ok(AdadeltaConfig {
            lr: h.float("lr")?,
            rho: h.float("rho")?,
            eps: h.float("eps")?,
            weight_decay: h.float("weight_decay")?,
            maximize: h.flag("maximize")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        for slot in 0..batch.slots() {
            scalars.increment(slot, 0);
        }
        engine::run(&AdadeltaKernel { config: self }, batch, exec);
        Ok(())
    }
}

struct AdadeltaKernel<'a> {
    config: &'a AdadeltaConfig,
}

impl Elementwise for AdadeltaKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 4);
        let mut block = AdadeltaBlock {
            lr_neg: T::from_f64(-c.lr),
            rho: T::from_f64(c.rho),
            one_minus_rho: T::from_f64(1.0 - c.rho),
            eps: T::from_f64(c.eps),
            weight_decay: (c.weight_decay != 0.0).then(|| T::from_f64(c.weight_decay)),
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            square_avg: arrays[2].as_mut_ptr(),
            acc_delta: arrays[3].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct AdadeltaBlock<T> {
    lr_neg: T,
    rho: T,
    one_minus_rho: T,
    eps: T,
    weight_decay: Option<T>,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    square_avg: *mut T,
    acc_delta: *mut T,
}

impl<T: Element> LaneBlock<T> for AdadeltaBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let p = s.load(self.param.add(i));
            let g = decayed_grad(
                s,
                p,
                s.load(self.grad.add(i)),
                self.maximize,
                self.weight_decay,
            );
            let (rho, one_minus_rho) = (s.splat(self.rho), s.splat(self.one_minus_rho));
            // square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
            let sq = s.mul(s.load(self.square_avg.add(i)), rho);
            let sq = s.mul_add(s.mul(one_minus_rho, g), g, sq);
            s.store(self.square_avg.add(i), sq);
            // std = square_avg.add(eps).sqrt_(); delta = acc_delta.add(eps).sqrt_()
            let std = s.sqrt(s.add(sq, s.splat(self.eps)));
            let acc = s.load(self.acc_delta.add(i));
            let delta = s.sqrt(s.add(acc, s.splat(self.eps)));
            // delta.div_(std).mul_(grad)
            let delta = s.mul(s.div(delta, std), g);
            // acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
            let acc = s.mul_add(s.mul(one_minus_rho, delta), delta, s.mul(acc, rho));
            s.store(self.acc_delta.add(i), acc);
            // param.add_(delta, alpha=-lr)
            s.store(self.param.add(i), s.mul_add(delta, s.splat(self.lr_neg), p));
        }
    }
}
