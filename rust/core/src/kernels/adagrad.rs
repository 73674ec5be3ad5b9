//! Adagrad (lr decay, weight decay, maximize) on dense gradients, operation
//! for operation as torch's `_single_tensor_adagrad` on its vectorised CPU path.

use super::{common_len, decayed_grad};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// Adagrad hyper-parameters of one parameter group (`initial_accumulator_value`
/// only fills the `sum` state torch creates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradConfig {
    pub lr: f64,
    pub lr_decay: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub maximize: bool,
}

impl Optimizer for AdagradConfig {
    const NAME: &'static str = "adagrad";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("lr_decay", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("eps", HyperKind::Float),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["sum"];
    const SCALARS: &'static [&'static str] = &["step"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        Ok(AdagradConfig {
            lr: h.float("lr")?,
            lr_decay: h.float("lr_decay")?,
            weight_decay: h.float("weight_decay")?,
            eps: h.float("eps")?,
            maximize: h.flag("maximize")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        // clr = lr / (1 + (step - 1) * lr_decay), in f64 as torch computes it in Python.
        let clr: Vec<f64> = (0..batch.slots())
            .map(|slot| {
                let step = scalars.increment(slot, 0);
                self.lr / (1.0 + (step - 1.0) * self.lr_decay)
            })
            .collect();
        engine::run(
            &AdagradKernel {
                config: self,
                clr: &clr,
            },
            batch,
            exec,
        );
        Ok(())
    }
}

struct AdagradKernel<'a> {
    config: &'a AdagradConfig,
    clr: &'a [f64],
}

impl Elementwise for AdagradKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 3);
        let mut block = AdagradBlock {
            clr_neg: T::from_f64(-self.clr[slot]),
            eps: T::from_f64(c.eps),
            weight_decay: (c.weight_decay != 0.0).then(|| T::from_f64(c.weight_decay)),
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            sum: arrays[2].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct AdagradBlock<T> {
    clr_neg: T,
    eps: T,
    weight_decay: Option<T>,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    sum: *mut T,
}

impl<T: Element> LaneBlock<T> for AdagradBlock<T> {
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
            // state_sum.addcmul_(grad, grad, value=1)
            let sum = s.mul_add(g, g, s.load(self.sum.add(i)));
            s.store(self.sum.add(i), sum);
            // std = state_sum.sqrt().add_(eps); param.addcdiv_(grad, std, value=-clr)
            let std = s.add(s.sqrt(sum), s.splat(self.eps));
            let p = s.add(p, s.div(s.mul(s.splat(self.clr_neg), g), std));
            s.store(self.param.add(i), p);
        }
    }
}
