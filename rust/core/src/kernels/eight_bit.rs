//! What the kernels with 8-bit block-wise state share: the checks of a
//! batch before any write, and the parameter of a work item, float32 or
//! bfloat16 (widened block by block and stored back with the call's rounding).

use crate::engine::Exec;
use crate::error::{Error, Result};
use crate::rounding::ParamRounding;
use crate::storage::{typed, FusedBody, Mem, ParamMem, MAX_STATE};
use crate::tensors::{Column, DType, TensorBatch};
use half::bf16;

/// Refuses, before anything is written, parameters other than float32 and
/// bfloat16 and Kahan summation (which has no 8-bit form).
pub(crate) fn check_batch(name: &str, batch: &TensorBatch, exec: Exec) -> Result<()> {
    let takes = |d: DType| matches!(d, DType::F32 | DType::BF16);
    if let Some(slot) = (0..batch.slots()).find(|&i| !takes(batch.slot(i).dtype)) {
        return Err(Error::Unsupported(format!(
            "{name}: tensor {slot} is {}; 8-bit state takes float32 or bfloat16 parameters",
            batch.slot(slot).dtype.name()
        )));
    }
    if exec.rounding == ParamRounding::Kahan {
        return Err(Error::InvalidArgument(format!(
            "{name}: Kahan summation is not available with 8-bit state; use stochastic rounding"
        )));
    }
    Ok(())
}

/// How a call stores bfloat16 weights back: its rounding, and each slot's
/// random stream with the stream element the slot starts at (stochastic rounding).
pub(crate) struct Weights {
    rounding: ParamRounding,
    streams: Vec<(usize, usize)>,
}

impl Weights {
    pub(crate) fn new(batch: &TensorBatch, exec: Exec) -> Weights {
        Weights {
            rounding: exec.rounding,
            streams: (0..batch.slots())
                .map(|i| (batch.stream(i), batch.offset(i)))
                .collect(),
        }
    }
}

/// A work item's parameter and gradient: float32, updated in place, or
/// bfloat16, widened block by block and stored back with the kernel's rounding.
pub(crate) enum Param<'c> {
    F32(&'c mut [f32], &'c mut [f32]),
    BF16 {
        param: &'c mut [bf16],
        grad: &'c mut [bf16],
        rounding: ParamRounding,
        /// The slot's random stream and the slot element the work item starts at (stochastic rounding's index).
        at: (usize, usize),
    },
}

impl<'c> Param<'c> {
    /// The parameter and gradient columns of a work item starting `start` elements into slot `slot`.
    pub(crate) fn new(
        weights: &Weights,
        slot: usize,
        start: usize,
        param: &'c mut Column<'_>,
        grad: &'c mut Column<'_>,
    ) -> Param<'c> {
        match (param, grad) {
            (Column::F32(p), Column::F32(g)) => Param::F32(p, g),
            (Column::BF16(p), Column::BF16(g)) => Param::BF16 {
                param: p,
                grad: g,
                rounding: weights.rounding,
                at: (weights.streams[slot].0, weights.streams[slot].1 + start),
            },
            _ => unreachable!("the step checked the parameter dtypes"),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Param::F32(p, _) => p.len(),
            Param::BF16 { param, .. } => param.len(),
        }
    }

    /// Runs `update` on elements `at` with the dequantised `moments` of that
    /// block (each `at.len()` long); bfloat16 weights are widened and stored back
    /// with the call's rounding in the same pass.
    pub(crate) fn update_block<B: FusedBody>(
        &mut self,
        at: std::ops::Range<usize>,
        moments: &mut [&mut [f32]],
        update: &mut B,
    ) {
        assert!(moments.len() <= MAX_STATE && moments.iter().all(|m| m.len() == at.len()));
        match self {
            Param::F32(p, g) => {
                let mut state = [std::ptr::null_mut(); MAX_STATE];
                for (k, m) in moments.iter_mut().enumerate() {
                    state[k] = m.as_mut_ptr();
                }
                update.run(p[at.clone()].as_mut_ptr(), g[at].as_mut_ptr(), state)
            }
            Param::BF16 {
                param,
                grad,
                rounding,
                at: (stream, start),
            } => {
                let p = Mem::BF16(param[at.clone()].as_mut_ptr().cast());
                let p = ParamMem::new(p, *rounding, None, *stream, *start + at.start);
                let g = Mem::BF16(grad[at].as_mut_ptr().cast());
                let mut state = [Mem::F32(std::ptr::null_mut()); MAX_STATE];
                for (k, m) in moments.iter_mut().enumerate() {
                    state[k] = Mem::F32(m.as_mut_ptr());
                }
                typed(p, g, &state[..moments.len()], update)
            }
        }
    }
}
