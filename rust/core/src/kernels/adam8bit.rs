//! Adam / AdamW with 8-bit block-wise state, as bitsandbytes' `Adam8bit` /
//! `AdamW8bit`: per parameter, the moments are u8 codes ([`crate::quant`]:
//! signed map for `exp_avg`, unsigned for `exp_avg_sq`) with one f32 absmax
//! per block of [`BLOCK`] values. Each block is dequantised into f32 scratch,
//! updated by the same per-element code as [`super::adam`] (so given the
//! same dequantised state it computes what `oxoptim.Adam`/`AdamW` would),
//! and quantised back, in one pass. Blocks are independent, so the result is
//! the same whatever the thread count or SIMD path.

use super::adam::{AdamConfig, BiasCorrection, FusedAdam};
use super::eight_bit::{check_batch, Param, Weights};
use crate::dispatch::{dispatch_codes, Backend, WithLanes};
use crate::engine::{self, Blockwise, Exec};
use crate::error::Result;
use crate::optimizer::{Hyper, HyperKind, Optimizer};
use crate::quant::{Codebook, Map, BLOCK};
use crate::simd::Lanes;
use crate::tensors::{ArraySpec, Column, DType, Extent, ScalarState, TensorBatch};

/// One group's settings: Adam's, without AMSGrad and maximize (bitsandbytes
/// has neither for 8-bit state).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam8bitConfig {
    pub adam: AdamConfig,
}

/// `[param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax]`.
const SPECS: [ArraySpec; 6] = [
    ArraySpec::LIKE_PARAM,
    ArraySpec::LIKE_PARAM,
    ArraySpec::new(DType::U8, Extent::Param),
    ArraySpec::new(DType::U8, Extent::Param),
    ArraySpec::new(DType::F32, Extent::PerBlock(BLOCK)),
    ArraySpec::new(DType::F32, Extent::PerBlock(BLOCK)),
];

impl Optimizer for Adam8bitConfig {
    const NAME: &'static str = "adam8bit";
    const TORCH_TWIN: bool = false;
    const HYPER: &'static [(&'static str, HyperKind)] = &[
        ("lr", HyperKind::Float),
        ("betas", HyperKind::Pair),
        ("eps", HyperKind::Float),
        ("weight_decay", HyperKind::Float),
        ("decoupled_weight_decay", HyperKind::Flag),
    ];
    const STATE: &'static [&'static str] = &[
        "exp_avg",
        "exp_avg_sq",
        "exp_avg_absmax",
        "exp_avg_sq_absmax",
    ];
    const SCALARS: &'static [&'static str] = &["step"];
    const PARAM_DTYPES: &'static [DType] = &[DType::F32, DType::BF16];

    fn from_hyper(h: &mut Hyper) -> Result<Self> {
        let (beta1, beta2) = h.pair("betas")?;
        Ok(Adam8bitConfig {
            adam: AdamConfig {
                lr: h.float("lr")?,
                beta1,
                beta2,
                eps: h.float("eps")?,
                weight_decay: h.float("weight_decay")?,
                amsgrad: false,
                maximize: false,
                decoupled_weight_decay: h.flag("decoupled_weight_decay")?,
            },
        })
    }

    fn state_keys(&self) -> Vec<&'static str> {
        Self::STATE.to_vec()
    }

    fn array_specs(&self) -> Vec<ArraySpec> {
        SPECS.to_vec()
    }

    fn check(&self, batch: &TensorBatch, scalars: &ScalarState, exec: Exec) -> Result<()> {
        check_batch(Self::NAME, batch, exec)?;
        // Adam's errors for a step counter its bias corrections cannot take.
        for i in 0..batch.slots() {
            BiasCorrection::check(&self.adam, scalars.incremented(i, 0), batch.slot(i).dtype)?;
        }
        Ok(())
    }

    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        // Checked before the first counter is written.
        self.check(batch, scalars, exec)?;
        let per_slot: Vec<BiasCorrection> = (0..batch.slots())
            .map(|i| BiasCorrection::new(&self.adam, scalars.increment(i, 0)))
            .collect();
        engine::run_blockwise(
            &Adam8bitKernel {
                config: &self.adam,
                per_slot: &per_slot,
                m: Codebook::get(Map::Signed),
                v: Codebook::get(Map::Unsigned),
                weights: Weights::new(batch, exec),
            },
            batch,
            exec,
        );
        Ok(())
    }
}

struct Adam8bitKernel<'a> {
    config: &'a AdamConfig,
    per_slot: &'a [BiasCorrection],
    m: &'static Codebook,
    v: &'static Codebook,
    weights: Weights,
}

impl Blockwise for Adam8bitKernel<'_> {
    const BLOCK: usize = BLOCK;

    fn apply(&self, backend: Backend, slot: usize, columns: &mut [Column<'_>]) {
        self.apply_at(backend, slot, 0, columns)
    }

    fn apply_at(&self, backend: Backend, slot: usize, start: usize, columns: &mut [Column<'_>]) {
        let [param, grad, Column::U8(m_codes), Column::U8(v_codes), Column::F32(m_absmax), Column::F32(v_absmax)] =
            columns
        else {
            unreachable!("the batch was checked against SPECS");
        };
        let param = Param::new(&self.weights, slot, start, param, grad);
        dispatch_codes(
            backend,
            &mut Blocks {
                kernel: self,
                bc: self.per_slot[slot],
                param,
                m_codes,
                v_codes,
                m_absmax,
                v_absmax,
            },
        );
    }
}

/// One work item's blocks, run inside the chosen instruction set.
struct Blocks<'k, 'a, 'c> {
    kernel: &'k Adam8bitKernel<'a>,
    bc: BiasCorrection,
    param: Param<'c>,
    m_codes: &'c mut [u8],
    v_codes: &'c mut [u8],
    m_absmax: &'c mut [f32],
    v_absmax: &'c mut [f32],
}

impl WithLanes<f32> for Blocks<'_, '_, '_> {
    #[inline(always)]
    fn run<S: Lanes<f32>>(&mut self, simd: S) {
        let k = self.kernel;
        let n = self.param.len();
        assert!(self.m_codes.len() == n && self.v_codes.len() == n);
        assert!(
            self.m_absmax.len() == n.div_ceil(BLOCK) && self.v_absmax.len() == n.div_ceil(BLOCK)
        );
        let mut m = [0f32; BLOCK];
        let mut v = [0f32; BLOCK];
        for b in 0..n.div_ceil(BLOCK) {
            let at = b * BLOCK..n.min((b + 1) * BLOCK);
            let len = at.len();
            let (m, v) = (&mut m[..len], &mut v[..len]);
            k.m.dequantize_block(simd, &self.m_codes[at.clone()], self.m_absmax[b], m);
            k.v.dequantize_block(simd, &self.v_codes[at.clone()], self.v_absmax[b], v);
            let mut update = FusedAdam {
                config: k.config,
                bc: self.bc,
                on: simd,
                n: len,
            };
            self.param
                .update_block(at.clone(), &mut [&mut *m, &mut *v], &mut update);
            self.m_absmax[b] = k.m.quantize_block(simd, m, &mut self.m_codes[at.clone()]);
            self.v_absmax[b] = k.v.quantize_block(simd, v, &mut self.v_codes[at]);
        }
    }
}
