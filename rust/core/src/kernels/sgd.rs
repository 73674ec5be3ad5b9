//! SGD with momentum, dampening, Nesterov, weight decay and maximize,
//! operation for operation as torch's `_single_tensor_sgd`.

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::{Error, Result};
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// SGD hyper-parameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

impl SgdConfig {
    /// Arrays per tensor slot: `[param, grad]`, plus the momentum buffer when momentum is on.
    pub fn arity(&self) -> usize {
        if self.momentum != 0.0 {
            3
        } else {
            2
        }
    }
}

impl Optimizer for SgdConfig {
    const NAME: &'static str = "sgd";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("momentum", HyperKind::Float),
        ("dampening", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("nesterov", HyperKind::Flag),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["momentum_buffer"];
    const SCALARS: &'static [&'static str] = &[];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        Ok(SgdConfig {
            lr: h.float("lr")?,
            momentum: h.float("momentum")?,
            dampening: h.float("dampening")?,
            weight_decay: h.float("weight_decay")?,
            nesterov: h.flag("nesterov")?,
            maximize: h.flag("maximize")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE[..self.arity() - 2].to_vec()
    }

    /// Momentum buffers must exist: torch creates them on a parameter's
    /// first step (as the gradient itself), which stays torch's to run.
    fn step(&self, batch: &TensorBatch, _scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        sgd_step(self, batch, &vec![false; batch.slots()], exec)
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
    engine::run(&SgdKernel { config, fresh }, batch, exec);
    Ok(())
}

struct SgdKernel<'a> {
    config: &'a SgdConfig,
    fresh: &'a [bool],
}

impl Elementwise for SgdKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, c.arity());
        let mut block = SgdBlock {
            lr_neg: T::from_f64(-c.lr),
            momentum: T::from_f64(c.momentum),
            blend: T::from_f64(1.0 - c.dampening),
            weight_decay: T::from_f64(c.weight_decay),
            use_weight_decay: c.weight_decay != 0.0,
            use_momentum: c.momentum != 0.0,
            fresh: c.momentum != 0.0 && self.fresh[slot],
            nesterov: c.nesterov,
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            buf: arrays
                .get_mut(2)
                .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr()),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }

    fn writes(&self, k: usize) -> bool {
        k != 1
    }
}

struct SgdBlock<T> {
    lr_neg: T,
    momentum: T,
    blend: T,
    weight_decay: T,
    use_weight_decay: bool,
    use_momentum: bool,
    fresh: bool,
    nesterov: bool,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    buf: *mut T,
}

impl<T: Element> LaneBlock<T> for SgdBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays; `buf` is
        // only touched when momentum is on, where it is a full array.
        unsafe {
            let mut p = s.load(self.param.add(i));
            let mut g = s.load(self.grad.add(i));
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE)); // exact negation, -0 included
            }
            if self.use_weight_decay {
                g = s.mul_add(p, s.splat(self.weight_decay), g);
            }
            if self.use_momentum {
                let buf = if self.fresh {
                    g
                } else {
                    let decayed = s.mul(s.load(self.buf.add(i)), s.splat(self.momentum));
                    s.mul_add(g, s.splat(self.blend), decayed)
                };
                s.store(self.buf.add(i), buf);
                g = if self.nesterov {
                    s.mul_add(buf, s.splat(self.momentum), g)
                } else {
                    buf
                };
            }
            p = s.mul_add(g, s.splat(self.lr_neg), p);
            s.store(self.param.add(i), p);
        }
    }
}
