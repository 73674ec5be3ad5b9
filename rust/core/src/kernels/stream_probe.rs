//! A streaming-bandwidth probe that runs on the kernels' own engine: the same
//! work items, worker threads, SIMD dispatch and memory as an optimizer step,
//! with one multiply-add per written element instead of the optimizer's
//! arithmetic. Over arrays far larger than the last-level cache it measures
//! the memory speed an element-wise step of that stream mix can reach here,
//! so a kernel cannot beat it except by noise (`benches/bandwidth.py`).
//!
//! Arrays are laid out as an optimizer's: `[param, grad, state...]`, the
//! gradient only read:
//!   2 arrays  p = p·c + g                              (plain SGD, EMA)
//!   3 arrays  m = m·c + g; p = p·c + m                 (SGD with momentum)
//!   4 arrays  m = m·c + g; v = v·c + g; p = p·c + m + v (Adam, AdamW)

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::{Error, Result};
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::TensorBatch;

/// Runs one probe pass over `[param, grad(, m(, v))]` slots (2 to 4 arrays).
pub fn stream_probe(batch: &TensorBatch, exec: Exec) -> Result<()> {
    let arity = batch.arity();
    if !(2..=4).contains(&arity) {
        return Err(Error::Mismatch(format!(
            "the stream probe takes 2 to 4 arrays per tensor, got {arity}"
        )));
    }
    engine::run(&ProbeKernel { arity }, batch, exec);
    Ok(())
}

struct ProbeKernel {
    arity: usize,
}

impl Elementwise for ProbeKernel {
    fn apply<T: Element>(&self, backend: Backend, _slot: usize, arrays: &mut [&mut [T]]) {
        let n = common_len(arrays, self.arity);
        let mut ptrs = [std::ptr::null_mut(); 4];
        for (p, a) in ptrs.iter_mut().zip(arrays.iter_mut()) {
            *p = a.as_mut_ptr();
        }
        let mut block = ProbeBlock {
            c: T::from_f64(0.999),
            arity: self.arity,
            ptrs,
        };
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }

    fn writes(&self, k: usize) -> bool {
        k != 1 // the gradient is only read
    }
}

struct ProbeBlock<T> {
    c: T,
    arity: usize,
    ptrs: [*mut T; 4],
}

impl<T: Element> LaneBlock<T> for ProbeBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        let c = s.splat(self.c);
        let [p, g, m, v] = self.ptrs.map(|a| a.wrapping_add(i));
        // SAFETY: `run_blocks` keeps i + WIDTH within every array in use.
        unsafe {
            let grad = s.load(g);
            let step = match self.arity {
                2 => grad,
                3 => {
                    let m1 = s.mul_add(s.load(m), c, grad);
                    s.store(m, m1);
                    m1
                }
                _ => {
                    let m1 = s.mul_add(s.load(m), c, grad);
                    let v1 = s.mul_add(s.load(v), c, grad);
                    s.store(m, m1);
                    s.store(v, v1);
                    s.add(m1, v1)
                }
            };
            s.store(p, s.mul_add(s.load(p), c, step));
        }
    }
}
