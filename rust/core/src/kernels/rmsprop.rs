//! RMSprop (centered, momentum, weight decay, maximize), operation for
//! operation as torch's `_single_tensor_rmsprop` on its vectorised CPU path.

use super::{common_len, decayed_grad, Lerp};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// RMSprop hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmspropConfig {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
    pub maximize: bool,
}

impl Optimizer for RmspropConfig {
    const NAME: &'static str = "rmsprop";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("alpha", HyperKind::Float),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("momentum", HyperKind::Float),
        ("centered", HyperKind::Flag),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["square_avg", "momentum_buffer", "grad_avg"];
    const SCALARS: &'static [&'static str] = &["step"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        Ok(RmspropConfig {
            lr: h.float("lr")?,
            alpha: h.float("alpha")?,
            eps: h.float("eps")?,
            weight_decay: h.float("weight_decay")?,
            momentum: h.float("momentum")?,
            centered: h.flag("centered")?,
            maximize: h.flag("maximize")?,
        })
    }

    /// `[square_avg(, momentum_buffer)(, grad_avg)]`: torch keeps a buffer only when `momentum > 0`.
    fn state_keys(&self) -> Vec<&'static str> {
        let mut keys = vec!["square_avg"];
        if self.momentum > 0.0 {
            keys.push("momentum_buffer");
        }
        if self.centered {
            keys.push("grad_avg");
        }
        keys
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        for slot in 0..batch.slots() {
            scalars.increment(slot, 0);
        }
        engine::run(&RmspropKernel { config: self }, batch, exec);
        Ok(())
    }
}

struct RmspropKernel<'a> {
    config: &'a RmspropConfig,
}

impl Elementwise for RmspropKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let use_momentum = c.momentum > 0.0;
        let n = common_len(arrays, 3 + use_momentum as usize + c.centered as usize);
        let (buf_at, avg_at) = (3, if use_momentum { 4 } else { 3 });
        let mut block = RmspropBlock {
            lr_neg: T::from_f64(-c.lr),
            alpha: T::from_f64(c.alpha),
            one_minus_alpha: T::from_f64(1.0 - c.alpha),
            grad_avg_lerp: Lerp::new(1.0 - c.alpha),
            eps: T::from_f64(c.eps),
            momentum: T::from_f64(c.momentum),
            weight_decay: (c.weight_decay != 0.0).then(|| T::from_f64(c.weight_decay)),
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            square_avg: arrays[2].as_mut_ptr(),
            momentum_buffer: if use_momentum {
                arrays[buf_at].as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            grad_avg: if c.centered {
                arrays[avg_at].as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct RmspropBlock<T> {
    lr_neg: T,
    alpha: T,
    one_minus_alpha: T,
    grad_avg_lerp: Lerp<T>,
    eps: T,
    momentum: T,
    weight_decay: Option<T>,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    square_avg: *mut T,
    /// Null unless `momentum > 0`.
    momentum_buffer: *mut T,
    /// Null unless centered.
    grad_avg: *mut T,
}

impl<T: Element> LaneBlock<T> for RmspropBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays; the optional
        // arrays are only touched when they were passed (non-null).
        unsafe {
            let mut p = s.load(self.param.add(i));
            let g = decayed_grad(
                s,
                p,
                s.load(self.grad.add(i)),
                self.maximize,
                self.weight_decay,
            );
            // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
            let sq = s.mul(s.load(self.square_avg.add(i)), s.splat(self.alpha));
            let sq = s.mul_add(s.mul(s.splat(self.one_minus_alpha), g), g, sq);
            s.store(self.square_avg.add(i), sq);
            let avg = if self.grad_avg.is_null() {
                s.sqrt(sq)
            } else {
                // grad_avg.lerp_(grad, 1 - alpha); square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                let ga = self.grad_avg_lerp.apply(s, s.load(self.grad_avg.add(i)), g);
                s.store(self.grad_avg.add(i), ga);
                s.sqrt(s.mul_add(s.mul(s.splat(-T::ONE), ga), ga, sq))
            };
            let avg = s.add(avg, s.splat(self.eps));
            if self.momentum_buffer.is_null() {
                // param.addcdiv_(grad, avg, value=-lr)
                p = s.add(p, s.div(s.mul(s.splat(self.lr_neg), g), avg));
            } else {
                // buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
                let buf = s.mul(s.load(self.momentum_buffer.add(i)), s.splat(self.momentum));
                let buf = s.add(buf, s.div(g, avg));
                s.store(self.momentum_buffer.add(i), buf);
                p = s.mul_add(buf, s.splat(self.lr_neg), p);
            }
            s.store(self.param.add(i), p);
        }
    }
}
