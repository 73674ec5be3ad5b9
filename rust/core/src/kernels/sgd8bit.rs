//! SGD with momentum whose momentum buffer is 8-bit block-wise state, as
//! bitsandbytes' `SGD8bit`: per parameter, `momentum_buffer` is u8 codes of
//! the signed dynamic map ([`crate::quant`]) with one f32 absmax per block of
//! [`BLOCK`] values. Each block is dequantised into f32 scratch, updated by
//! [`super::sgd`]'s per-element code (so given the same dequantised buffer it
//! computes what `oxoptim.SGD` would, dampening, Nesterov and maximize
//! included), and quantised back, in one pass. A tensor's first step (its
//! `step` counter at 0) takes the buffer from the gradient, as torch does when
//! it creates the buffer.

use super::declare::PerElement;
use super::eight_bit::{check_batch, Param, Weights};
use super::sgd::{SgdConfig, SgdUpdate};
use crate::dispatch::{dispatch_codes, Backend, WithLanes};
use crate::engine::{self, Blockwise, Exec};
use crate::error::{Error, Result};
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::quant::{Codebook, Map, BLOCK};
use crate::simd::{LaneBlock, Lanes};
use crate::storage::{FusedBody, LaneArray, ParamArray, MAX_STATE};
use crate::tensors::{ArraySpec, Column, DType, Extent, ScalarState, TensorBatch};

/// One group's settings: SGD's, with momentum on (the only state there is to keep in 8 bits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd8bitConfig {
    pub sgd: SgdConfig,
}

/// `[param, grad, momentum_buffer, momentum_buffer_absmax]`.
const SPECS: [ArraySpec; 4] = [
    ArraySpec::LIKE_PARAM,
    ArraySpec::LIKE_PARAM,
    ArraySpec::new(DType::U8, Extent::Param),
    ArraySpec::new(DType::F32, Extent::PerBlock(BLOCK)),
];

impl Optimizer for Sgd8bitConfig {
    const NAME: &'static str = "sgd8bit";
    const TORCH_TWIN: bool = false;
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("momentum", HyperKind::Float),
        ("dampening", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("nesterov", HyperKind::Flag),
        ("maximize", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &["momentum_buffer", "momentum_buffer_absmax"];
    /// Steps taken: 0 marks a buffer not yet formed.
    const SCALARS: &'static [&'static str] = &["step"];
    const PARAM_DTYPES: &'static [DType] = &[DType::F32, DType::BF16];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let sgd = SgdConfig {
            lr: h.float("lr")?,
            momentum: h.float("momentum")?,
            dampening: h.float("dampening")?,
            weight_decay: h.float("weight_decay")?,
            nesterov: h.flag("nesterov")?,
            maximize: h.flag("maximize")?,
        };
        if sgd.momentum == 0.0 {
            return Err(Error::InvalidArgument(
                "sgd8bit: momentum=0 keeps no state to quantise; use sgd".into(),
            ));
        }
        Ok(Sgd8bitConfig { sgd })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn array_specs(&self) -> Vec<ArraySpec> {
        SPECS.to_vec()
    }

    fn check(&self, batch: &TensorBatch, _scalars: &ScalarState, exec: Exec) -> Result<()> {
        check_batch(Self::NAME, batch, exec)
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        // Checked before the first counter is written.
        self.check(batch, scalars, exec)?;
        let updates: Vec<SgdUpdate<f32>> = (0..batch.slots())
            .map(|i| self.sgd.update::<f32>(scalars.increment(i, 0) == 1.0))
            .collect();
        engine::run_blockwise(
            &Sgd8bitKernel {
                updates: &updates,
                codes: Codebook::get(Map::Signed),
                weights: Weights::new(batch, exec),
            },
            batch,
            exec,
        );
        Ok(())
    }
}

struct Sgd8bitKernel<'a> {
    /// Each slot's update (its `fresh` flag set on its first step).
    updates: &'a [SgdUpdate<f32>],
    codes: &'static Codebook,
    weights: Weights,
}

impl Blockwise for Sgd8bitKernel<'_> {
    const BLOCK: usize = BLOCK;

    fn apply(&self, backend: Backend, slot: usize, columns: &mut [Column<'_>]) {
        self.apply_at(backend, slot, 0, columns)
    }

    fn apply_at(&self, backend: Backend, slot: usize, start: usize, columns: &mut [Column<'_>]) {
        let [param, grad, Column::U8(codes), Column::F32(absmax)] = columns else {
            unreachable!("the batch was checked against SPECS");
        };
        dispatch_codes(
            backend,
            &mut Blocks {
                kernel: self,
                update: &self.updates[slot],
                param: Param::new(&self.weights, slot, start, param, grad),
                codes,
                absmax,
            },
        );
    }
}

/// One work item's blocks, run inside the chosen instruction set.
struct Blocks<'k, 'a, 'c> {
    kernel: &'k Sgd8bitKernel<'a>,
    update: &'k SgdUpdate<f32>,
    param: Param<'c>,
    codes: &'c mut [u8],
    absmax: &'c mut [f32],
}

impl WithLanes<f32> for Blocks<'_, '_, '_> {
    #[inline(always)]
    fn run<S: Lanes<f32>>(&mut self, simd: S) {
        let k = self.kernel;
        let n = self.param.len();
        assert!(self.codes.len() == n && self.absmax.len() == n.div_ceil(BLOCK));
        let mut buf = [0f32; BLOCK];
        for b in 0..n.div_ceil(BLOCK) {
            let at = b * BLOCK..n.min((b + 1) * BLOCK);
            let buf = &mut buf[..at.len()];
            k.codes
                .dequantize_block(simd, &self.codes[at.clone()], self.absmax[b], buf);
            let mut update = FusedSgd {
                update: self.update,
                on: simd,
                n: at.len(),
            };
            self.param
                .update_block(at.clone(), &mut [&mut *buf], &mut update);
            self.absmax[b] = k.codes.quantize_block(simd, buf, &mut self.codes[at]);
        }
    }
}

/// SGD's update of `n` elements of arrays of any [`crate::storage`] types, on entered vectors.
struct FusedSgd<'u, S> {
    update: &'u SgdUpdate<f32>,
    on: S,
    n: usize,
}

impl<S: Lanes<f32>> FusedBody for FusedSgd<'_, S> {
    #[inline(always)]
    fn run<P: ParamArray<f32>, G: LaneArray<f32>, A: LaneArray<f32>>(
        &mut self,
        param: P,
        grad: G,
        state: [A; MAX_STATE],
    ) {
        let mut block = SgdBlock {
            update: self.update,
            arrays: (param, grad, state[0]),
        };
        // SAFETY: the caller hands `n` elements of every array.
        unsafe { crate::simd::run_blocks(self.on, self.n, &mut block) };
    }
}

/// [`SgdUpdate`] bound to one block's arrays.
struct SgdBlock<'u, P, G, A> {
    update: &'u SgdUpdate<f32>,
    arrays: (P, G, A),
}

impl<P: ParamArray<f32>, G: LaneArray<f32>, A: LaneArray<f32>> LaneBlock<f32>
    for SgdBlock<'_, P, G, A>
{
    #[inline(always)]
    unsafe fn apply<L: Lanes<f32>>(&mut self, s: L, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays.
        unsafe { self.update.apply_at(s, self.arrays, i) }
    }
}
