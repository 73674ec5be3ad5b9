//! Adamax (the infinity-norm Adam) with weight decay and maximize, operation
//! for operation as torch's `_single_tensor_adamax` on its vectorised CPU path.

use super::{common_len, decayed_grad, Lerp};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// Adamax hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Optimizer for AdamaxConfig {
    const NAME: &'static str = "adamax";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("betas", HyperKind::Pair),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["exp_avg", "exp_inf"];
    const SCALARS: &'static [&'static str] = &["step"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let (beta1, beta2) = h.pair("betas")?;
        Ok(AdamaxConfig {
            lr: h.float("lr")?,
            beta1,
            beta2,
            eps: h.float("eps")?,
            weight_decay: h.float("weight_decay")?,
            maximize: h.flag("maximize")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        // clr = lr / (1 - beta1 ** step), in f64 as torch computes it in Python.
        let clr: Vec<f64> = (0..batch.slots())
            .map(|slot| {
                let step = scalars.increment(slot, 0);
                self.lr / (1.0 - self.beta1.powf(step))
            })
            .collect();
        engine::run(
            &AdamaxKernel {
                config: self,
                clr: &clr,
            },
            batch,
            exec,
        );
        Ok(())
    }
}

struct AdamaxKernel<'a> {
    config: &'a AdamaxConfig,
    clr: &'a [f64],
}

impl Elementwise for AdamaxKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 4);
        let mut block = AdamaxBlock {
            exp_avg_lerp: Lerp::new(1.0 - c.beta1),
            beta2: T::from_f64(c.beta2),
            eps: T::from_f64(c.eps),
            clr_neg: T::from_f64(-self.clr[slot]),
            weight_decay: (c.weight_decay != 0.0).then(|| T::from_f64(c.weight_decay)),
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            exp_avg: arrays[2].as_mut_ptr(),
            exp_inf: arrays[3].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct AdamaxBlock<T> {
    exp_avg_lerp: Lerp<T>,
    beta2: T,
    eps: T,
    clr_neg: T,
    weight_decay: Option<T>,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    exp_avg: *mut T,
    exp_inf: *mut T,
}

impl<T: Element> LaneBlock<T> for AdamaxBlock<T> {
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
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = self.exp_avg_lerp.apply(s, s.load(self.exp_avg.add(i)), g);
            s.store(self.exp_avg.add(i), m);
            // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
            let decayed = s.mul(s.load(self.exp_inf.add(i)), s.splat(self.beta2));
            let u = s.max(decayed, s.add(s.abs(g), s.splat(self.eps)));
            s.store(self.exp_inf.add(i), u);
            // param.addcdiv_(exp_avg, exp_inf, value=-clr)
            let p = s.add(p, s.div(s.mul(s.splat(self.clr_neg), m), u));
            s.store(self.param.add(i), p);
        }
    }
}
