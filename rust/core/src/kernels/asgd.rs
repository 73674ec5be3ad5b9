//! Averaged SGD (weight decay, maximize), operation for operation as torch's
//! `_single_tensor_asgd` on its vectorised CPU path, with its per-parameter
//! `eta` and `mu` kept in their 0-d tensors as torch keeps them.

use super::{common_len, decayed_grad};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// ASGD hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsgdConfig {
    pub lr: f64,
    pub lambd: f64,
    pub alpha: f64,
    pub t0: f64,
    pub weight_decay: f64,
    pub maximize: bool,
    /// torch stores each new `eta`/`mu` through `torch.as_tensor(float)`, so
    /// they are rounded to the default dtype before the cell's own dtype.
    pub default_float32: bool,
}

impl Optimizer for AsgdConfig {
    const NAME: &'static str = "asgd";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("lambd", HyperKind::Float),
        ("alpha", HyperKind::Float),
        ("t0", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("maximize", HyperKind::Flag),
        ("default_float32", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["ax"];
    const SCALARS: &'static [&'static str] = &["step", "eta", "mu"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        Ok(AsgdConfig {
            lr: h.float("lr")?,
            lambd: h.float("lambd")?,
            alpha: h.float("alpha")?,
            t0: h.float("t0")?,
            weight_decay: h.float("weight_decay")?,
            maximize: h.flag("maximize")?,
            default_float32: h.flag("default_float32")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    /// The update uses this step's `eta` and `mu` as stored; the values for
    /// the next step are then computed from the new step count.
    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        let per_slot: Vec<(f64, f64)> = (0..batch.slots())
            .map(|slot| {
                let step = scalars.increment(slot, 0);
                let (eta, mu) = (scalars.get(slot, 1), scalars.get(slot, 2));
                let stored = |v: f64| {
                    if self.default_float32 {
                        v as f32 as f64
                    } else {
                        v
                    }
                };
                let new_eta = self.lr / (1.0 + self.lambd * self.lr * step).powf(self.alpha);
                scalars.set(slot, 1, stored(new_eta));
                scalars.set(slot, 2, stored(1.0 / (step - self.t0).max(1.0)));
                (eta, mu)
            })
            .collect();
        engine::run(
            &AsgdKernel {
                config: self,
                per_slot: &per_slot,
            },
            batch,
            exec,
        );
        Ok(())
    }
}

struct AsgdKernel<'a> {
    config: &'a AsgdConfig,
    /// Each parameter's `(eta, mu)` for this step.
    per_slot: &'a [(f64, f64)],
}

impl Elementwise for AsgdKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 3);
        let (eta, mu) = self.per_slot[slot];
        let mut block = AsgdBlock {
            param_decay: T::from_f64(1.0 - c.lambd * eta),
            eta_neg: T::from_f64(-eta),
            // torch copies the parameter while `mu.item() == 1`.
            mu: (mu != 1.0).then(|| T::from_f64(mu)),
            weight_decay: (c.weight_decay != 0.0).then(|| T::from_f64(c.weight_decay)),
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            ax: arrays[2].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct AsgdBlock<T> {
    param_decay: T,
    eta_neg: T,
    mu: Option<T>,
    weight_decay: Option<T>,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    ax: *mut T,
}

impl<T: Element> LaneBlock<T> for AsgdBlock<T> {
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
            // param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta)
            let p = s.mul_add(
                g,
                s.splat(self.eta_neg),
                s.mul(p, s.splat(self.param_decay)),
            );
            s.store(self.param.add(i), p);
            // ax.add_(param.sub(ax).mul_(mu)), or ax.copy_(param)
            let ax = match self.mu {
                Some(mu) => {
                    let ax = s.load(self.ax.add(i));
                    s.add(ax, s.mul(s.sub(p, ax), s.splat(mu)))
                }
                None => p,
            };
            s.store(self.ax.add(i), ax);
        }
    }
}
