//! RAdam (rectified Adam; coupled or decoupled weight decay; maximize),
//! operation for operation as torch's `_single_tensor_radam` on its
//! vectorised CPU path.

use super::{common_len, AdamMoments, AdamSettings, Moments};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// RAdam hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RadamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
}

impl Optimizer for RadamConfig {
    const NAME: &'static str = "radam";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("betas", HyperKind::Pair),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("decoupled_weight_decay", HyperKind::Flag),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];
    const SCALARS: &'static [&'static str] = &["step"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let (beta1, beta2) = h.pair("betas")?;
        Ok(RadamConfig {
            lr: h.float("lr")?,
            beta1,
            beta2,
            eps: h.float("eps")?,
            weight_decay: h.float("weight_decay")?,
            decoupled_weight_decay: h.flag("decoupled_weight_decay")?,
            maximize: h.flag("maximize")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        let per_slot: Vec<Rectification> = (0..batch.slots())
            .map(|slot| Rectification::new(self, scalars.increment(slot, 0)))
            .collect();
        engine::run(
            &RadamKernel {
                config: self,
                per_slot: &per_slot,
            },
            batch,
            exec,
        );
        Ok(())
    }
}

/// One parameter's step-dependent scalars, in f64 as torch computes them in Python.
#[derive(Clone, Copy, Debug)]
struct Rectification {
    bias_correction1: f64,
    bias_correction2_sqrt: f64,
    /// The variance rectification term, when the approximated SMA is long enough (`rho_t > 5`).
    rect: Option<f64>,
}

impl Rectification {
    fn new(c: &RadamConfig, step: f64) -> Rectification {
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        let rho_inf = 2.0 / (1.0 - c.beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * c.beta2.powf(step) / bias_correction2;
        let rect = (rho_t > 5.0).then(|| {
            ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5)
        });
        Rectification {
            bias_correction1,
            bias_correction2_sqrt: bias_correction2.powf(0.5),
            rect,
        }
    }
}

struct RadamKernel<'a> {
    config: &'a RadamConfig,
    per_slot: &'a [Rectification],
}

impl Elementwise for RadamKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 4);
        let r = self.per_slot[slot];
        let mut block = RadamBlock {
            moments: AdamMoments::new(AdamSettings {
                beta1: c.beta1,
                beta2: c.beta2,
                lr: c.lr,
                weight_decay: c.weight_decay,
                decoupled_weight_decay: c.decoupled_weight_decay,
                maximize: c.maximize,
            }),
            bias_correction1: T::from_f64(r.bias_correction1),
            bias_correction2_sqrt: T::from_f64(r.bias_correction2_sqrt),
            rect: r.rect.map(T::from_f64),
            lr: T::from_f64(c.lr),
            eps: T::from_f64(c.eps),
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            exp_avg: arrays[2].as_mut_ptr(),
            exp_avg_sq: arrays[3].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct RadamBlock<T> {
    moments: AdamMoments<T>,
    bias_correction1: T,
    bias_correction2_sqrt: T,
    rect: Option<T>,
    lr: T,
    eps: T,
    param: *mut T,
    grad: *const T,
    exp_avg: *mut T,
    exp_avg_sq: *mut T,
}

impl<T: Element> LaneBlock<T> for RadamBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let Moments {
                param: p,
                exp_avg: m,
                exp_avg_sq: v,
                ..
            } = self.moments.update(
                s,
                self.param.add(i),
                self.grad.add(i),
                self.exp_avg.add(i),
                self.exp_avg_sq.add(i),
            );
            // bias_corrected_exp_avg * lr (* adaptive_lr * rect when rectified)
            let mut update = s.mul(s.div(m, s.splat(self.bias_correction1)), s.splat(self.lr));
            if let Some(rect) = self.rect {
                // adaptive_lr = bias_correction2 ** 0.5 / (exp_avg_sq.sqrt() + eps),
                // which torch evaluates as (...).reciprocal() * bias_correction2 ** 0.5.
                let denom = s.add(s.sqrt(v), s.splat(self.eps));
                let adaptive = s.mul(
                    s.div(s.splat(T::ONE), denom),
                    s.splat(self.bias_correction2_sqrt),
                );
                update = s.mul(s.mul(update, adaptive), s.splat(rect));
            }
            // param.add_(update, alpha=-1.0)
            s.store(self.param.add(i), s.sub(p, update));
        }
    }
}
