//! Averaging kernels: exact gradient accumulation over micro-batches (a
//! running weighted mean), its write-back, in-place scaling (gradient
//! clipping), and the parameter EMA/SWA lerp.
//!
//! Every blend is torch's `lerp` formula — `start + w·(end − start)` for
//! `|w| < 0.5`, else `end − (1 − w)·(end − start)`, each a single FMA — so a
//! parameter average matches `torch._foreach_lerp_` and weight 1 copies.

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::{Error, Result};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::TensorBatch;

fn check_arity(batch: &TensorBatch, arity: usize, what: &str) -> Result<()> {
    if batch.arity() != arity {
        return Err(Error::Mismatch(format!(
            "{what} expects {arity} arrays per tensor, got {}",
            batch.arity()
        )));
    }
    Ok(())
}

fn check_weight(weight: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&weight) {
        return Err(Error::InvalidArgument(format!(
            "averaging weight must be in [0, 1], got {weight}"
        )));
    }
    Ok(())
}

/// Folds one micro-batch's gradient into the running mean, over `[mean, grad]` slots.
///
/// With `n` samples seen before and `m` in this micro-batch, `weight` is
/// `m / (n + m)` and the mean becomes `mean + weight·(grad − mean)`; `first`
/// copies the gradient (the mean's old contents are ignored). `clear_grad`
/// zeroes the gradient in the same pass, ready for the next `backward()`.
pub fn accumulate_mean(
    batch: &TensorBatch,
    weight: f64,
    first: bool,
    clear_grad: bool,
    exec: Exec,
) -> Result<()> {
    check_arity(batch, 2, "gradient accumulation")?;
    check_weight(weight)?;
    let kernel = LerpKernel {
        weight: if first { 1.0 } else { weight },
        copy: first,
        clear_source: clear_grad,
    };
    engine::run(&kernel, batch, exec);
    Ok(())
}

/// Parameter averaging over `[average, param]` slots: `average ← lerp(average, param, weight)`.
///
/// EMA uses `weight = 1 − decay`; SWA uses `1 / (n_averaged + 1)`.
pub fn lerp_average(batch: &TensorBatch, weight: f64, exec: Exec) -> Result<()> {
    check_arity(batch, 2, "parameter averaging")?;
    check_weight(weight)?;
    let kernel = LerpKernel {
        weight,
        copy: false,
        clear_source: false,
    };
    engine::run(&kernel, batch, exec);
    Ok(())
}

/// `dst ← src · scale` over `[dst, src]` slots (arity 2), or `x ← x · scale`
/// in place (arity 1). Writes the accumulated mean back into `.grad`, and
/// scales gradients for clipping.
pub fn scale_into(batch: &TensorBatch, scale: f64, exec: Exec) -> Result<()> {
    if !(1..=2).contains(&batch.arity()) {
        return Err(Error::Mismatch(format!(
            "scaling expects 1 or 2 arrays per tensor, got {}",
            batch.arity()
        )));
    }
    engine::run(&ScaleKernel { scale }, batch, exec);
    Ok(())
}

struct LerpKernel {
    weight: f64,
    copy: bool,
    clear_source: bool,
}

impl Elementwise for LerpKernel {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let n = common_len(arrays, 2);
        let w = T::from_f64(self.weight);
        let small = w.abs() < T::from_f64(0.5);
        let mut block = LerpBlock {
            coeff: if small { w } else { w - T::ONE },
            from_start: small,
            copy: self.copy,
            clear_source: self.clear_source,
            dst: arrays[0].as_mut_ptr(),
            src: arrays[1].as_mut_ptr(),
        };
        // SAFETY: both arrays hold `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }

    fn writes(&self, k: usize) -> bool {
        k == 0 || self.clear_source
    }
}

struct LerpBlock<T> {
    coeff: T,
    from_start: bool,
    copy: bool,
    clear_source: bool,
    dst: *mut T,
    src: *mut T,
}

impl<T: Element> LaneBlock<T> for LerpBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within both arrays.
        unsafe {
            let end = s.load(self.src.add(i));
            let out = if self.copy {
                end
            } else {
                let start = s.load(self.dst.add(i));
                let diff = s.sub(end, start);
                s.mul_add(
                    s.splat(self.coeff),
                    diff,
                    if self.from_start { start } else { end },
                )
            };
            s.store(self.dst.add(i), out);
            if self.clear_source {
                s.store(self.src.add(i), s.splat(T::ZERO));
            }
        }
    }
}

struct ScaleKernel {
    scale: f64,
}

impl Elementwise for ScaleKernel {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let arity = arrays.len();
        let n = common_len(arrays, arity);
        let dst = arrays[0].as_mut_ptr();
        let mut block = ScaleBlock {
            scale: T::from_f64(self.scale),
            dst,
            src: if arity == 2 { arrays[1].as_ptr() } else { dst },
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }

    fn writes(&self, k: usize) -> bool {
        k == 0
    }
}

struct ScaleBlock<T> {
    scale: T,
    dst: *mut T,
    src: *const T,
}

impl<T: Element> LaneBlock<T> for ScaleBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe {
            let x = s.load(self.src.add(i));
            s.store(self.dst.add(i), s.mul(x, s.splat(self.scale)));
        }
    }
}
