//! Rprop (resilient backpropagation, maximize), operation for operation as
//! torch's `_single_tensor_rprop` on its vectorised CPU path.

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// Rprop hyper-parameters of one parameter group (`lr` only fills the
/// `step_size` state torch creates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RpropConfig {
    pub etaminus: f64,
    pub etaplus: f64,
    pub step_size_min: f64,
    pub step_size_max: f64,
    pub maximize: bool,
}

impl Optimizer for RpropConfig {
    const NAME: &'static str = "rprop";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("etas", HyperKind::Pair),
        ("step_sizes", HyperKind::Pair),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["prev", "step_size"];
    const SCALARS: &'static [&'static str] = &["step"];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let (etaminus, etaplus) = h.pair("etas")?;
        let (step_size_min, step_size_max) = h.pair("step_sizes")?;
        Ok(RpropConfig {
            etaminus,
            etaplus,
            step_size_min,
            step_size_max,
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
        engine::run(&RpropKernel { config: self }, batch, exec);
        Ok(())
    }
}

struct RpropKernel<'a> {
    config: &'a RpropConfig,
}

impl Elementwise for RpropKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 4);
        let mut block = RpropBlock {
            etaminus: T::from_f64(c.etaminus),
            etaplus: T::from_f64(c.etaplus),
            step_size_min: T::from_f64(c.step_size_min),
            step_size_max: T::from_f64(c.step_size_max),
            maximize: c.maximize,
            param: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            prev: arrays[2].as_mut_ptr(),
            step_size: arrays[3].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct RpropBlock<T> {
    etaminus: T,
    etaplus: T,
    step_size_min: T,
    step_size_max: T,
    maximize: bool,
    param: *mut T,
    grad: *const T,
    prev: *mut T,
    step_size: *mut T,
}

impl<T: Element> LaneBlock<T> for RpropBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let mut g = s.load(self.grad.add(i));
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE));
            }
            let (zero, one) = (s.splat(T::ZERO), s.splat(T::ONE));
            let (etaminus, etaplus) = (s.splat(self.etaminus), s.splat(self.etaplus));
            // sign = grad.mul(prev).sign(), then etaplus where > 0, etaminus where < 0, 1 where 0
            // (torch's sign of NaN is 0).
            let prod = s.mul(g, s.load(self.prev.add(i)));
            let factor = s.lt_select(zero, prod, etaplus, s.lt_select(prod, zero, etaminus, one));
            // step_size.mul_(sign).clamp_(step_size_min, step_size_max), NaN kept.
            let size = s.mul(s.load(self.step_size.add(i)), factor);
            let lo = s.splat(self.step_size_min);
            let hi = s.splat(self.step_size_max);
            let size = s.lt_select(size, lo, lo, size);
            let size = s.lt_select(hi, size, hi, size);
            s.store(self.step_size.add(i), size);
            // grad[sign.eq(etaminus)] = 0: g where factor < etaminus or etaminus < factor, else 0.
            let g = s.lt_select(factor, etaminus, g, s.lt_select(etaminus, factor, g, zero));
            // param.addcmul_(grad.sign(), step_size, value=-1); prev.copy_(grad)
            let p = s.load(self.param.add(i));
            let p = s.mul_add(s.mul(s.splat(-T::ONE), s.sign(g)), size, p);
            s.store(self.param.add(i), p);
            s.store(self.prev.add(i), g);
        }
    }
}
