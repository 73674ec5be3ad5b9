//! Schedule-Free AdamW and SGD (Defazio et al. 2024, "The Road Less
//! Scheduled"), operation for operation as the reference package
//! `schedulefree`'s for-loop paths. The parameter holds y, the point the
//! gradient is taken at; state `z` is the base iterate. The group-level
//! schedule (warm-up, the averaging weight `ckp1`, the bias correction) is
//! computed by the caller, as the reference does in Python, and arrives as
//! hyper-parameters.
//!
//! ```text
//! AdamW:  v ← β2·v + (1 − β2)·g²;  d = g / (sqrt(v / bc2) + eps) + wd·y
//! SGD:    d = g + wd·y
//! both:   y ← lerp(y, z, ckp1);  y ← y + lr·(β1·(1 − ckp1) − 1)·d;  z ← z − lr·d
//! ```

use super::{common_len, Lerp, SecondMoment};
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch};

/// The per-step coefficients both variants share.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Interpolation {
    /// The scheduled learning rate (after warm-up).
    lr: f64,
    /// β1 (AdamW) or `momentum` (SGD).
    beta1: f64,
    /// Weight of this step's z in the running average of the iterates.
    ckp1: f64,
    weight_decay: f64,
}

impl Interpolation {
    fn coefficients<T: Element>(&self) -> Coefficients<T> {
        Coefficients {
            towards_z: Lerp::new(self.ckp1),
            // alpha=lr*(beta1*(1-ckp1)-1), in f64 as the reference computes it in Python.
            y_step: T::from_f64(self.lr * (self.beta1 * (1.0 - self.ckp1) - 1.0)),
            z_step: T::from_f64(-self.lr),
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64(self.weight_decay)),
        }
    }
}

#[derive(Clone, Copy)]
struct Coefficients<T> {
    towards_z: Lerp<T>,
    y_step: T,
    z_step: T,
    weight_decay: Option<T>,
}

impl<T: Element> Coefficients<T> {
    /// Decays the direction at y, then moves y and z; returns nothing, stores both.
    #[inline(always)]
    unsafe fn move_y_and_z<S: Lanes<T>>(&self, s: S, y: *mut T, z: *mut T, mut d: S::V) {
        // SAFETY: the caller's index is within both arrays.
        unsafe {
            let y_now = s.load(y);
            if let Some(wd) = self.weight_decay {
                // grad.add_(y, alpha=weight_decay)
                d = s.mul_add(y_now, s.splat(wd), d);
            }
            let z_now = s.load(z);
            // y.lerp_(end=z, weight=ckp1); y.add_(d, alpha=lr*(beta1*(1-ckp1)-1))
            let y_new = s.mul_add(
                d,
                s.splat(self.y_step),
                self.towards_z.apply(s, y_now, z_now),
            );
            s.store(y, y_new);
            // z.sub_(d, alpha=lr)
            s.store(z, s.mul_add(d, s.splat(self.z_step), z_now));
        }
    }
}

/// Schedule-Free AdamW settings of one group for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwScheduleFreeConfig {
    step: Interpolation,
    beta2: f64,
    eps: f64,
    bias_correction2: f64,
}

impl Optimizer for AdamwScheduleFreeConfig {
    const NAME: &'static str = "adamw_schedulefree";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("betas", HyperKind::Pair),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("ckp1", HyperKind::Float),
        ("bias_correction2", HyperKind::Float),
    ];
    const STATE: &'static [&'static str] = &["z", "exp_avg_sq"];
    const SCALARS: &'static [&'static str] = &[];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let lr = h.float("lr")?;
        let (beta1, beta2) = h.pair("betas")?;
        Ok(AdamwScheduleFreeConfig {
            beta2,
            eps: h.float("eps")?,
            step: Interpolation {
                lr,
                beta1,
                weight_decay: h.float("weight_decay")?,
                ckp1: h.float("ckp1")?,
            },
            bias_correction2: h.float("bias_correction2")?,
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, _scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        engine::run(&AdamwScheduleFreeKernel { config: self }, batch, exec);
        Ok(())
    }
}

struct AdamwScheduleFreeKernel<'a> {
    config: &'a AdamwScheduleFreeConfig,
}

impl Elementwise for AdamwScheduleFreeKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, 4);
        let mut block = AdamwScheduleFreeBlock {
            moves: c.step.coefficients(),
            second_moment: SecondMoment::new(c.beta2),
            bias_correction2: T::from_f64(c.bias_correction2),
            eps: T::from_f64(c.eps),
            y: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            z: arrays[2].as_mut_ptr(),
            exp_avg_sq: arrays[3].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct AdamwScheduleFreeBlock<T> {
    moves: Coefficients<T>,
    second_moment: SecondMoment<T>,
    bias_correction2: T,
    eps: T,
    y: *mut T,
    grad: *const T,
    z: *mut T,
    exp_avg_sq: *mut T,
}

impl<T: Element> LaneBlock<T> for AdamwScheduleFreeBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let g = s.load(self.grad.add(i));
            let v = self.second_moment.update(s, self.exp_avg_sq.add(i), g);
            // denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps); grad.div_(denom)
            let denom = s.add(
                s.sqrt(s.div(v, s.splat(self.bias_correction2))),
                s.splat(self.eps),
            );
            self.moves
                .move_y_and_z(s, self.y.add(i), self.z.add(i), s.div(g, denom));
        }
    }
}

/// Schedule-Free SGD settings of one group for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdScheduleFreeConfig {
    step: Interpolation,
}

impl Optimizer for SgdScheduleFreeConfig {
    const NAME: &'static str = "sgd_schedulefree";
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("momentum", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("ckp1", HyperKind::Float),
    ];
    const STATE: &'static [&'static str] = &["z"];
    const SCALARS: &'static [&'static str] = &[];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        Ok(SgdScheduleFreeConfig {
            step: Interpolation {
                lr: h.float("lr")?,
                beta1: h.float("momentum")?,
                weight_decay: h.float("weight_decay")?,
                ckp1: h.float("ckp1")?,
            },
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn step(&self, batch: &TensorBatch, _scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        engine::run(&SgdScheduleFreeKernel { config: self }, batch, exec);
        Ok(())
    }
}

struct SgdScheduleFreeKernel<'a> {
    config: &'a SgdScheduleFreeConfig,
}

impl Elementwise for SgdScheduleFreeKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let n = common_len(arrays, 3);
        let mut block = SgdScheduleFreeBlock {
            moves: self.config.step.coefficients(),
            y: arrays[0].as_mut_ptr(),
            grad: arrays[1].as_ptr(),
            z: arrays[2].as_mut_ptr(),
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }
}

struct SgdScheduleFreeBlock<T> {
    moves: Coefficients<T>,
    y: *mut T,
    grad: *const T,
    z: *mut T,
}

impl<T: Element> LaneBlock<T> for SgdScheduleFreeBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let g = s.load(self.grad.add(i));
            self.moves.move_y_and_z(s, self.y.add(i), self.z.add(i), g);
        }
    }
}
