//! Adam on bfloat16 weights or state runs fused (`oxoptim_core::storage`:
//! widened and rounded vector by vector, no f32 staging). Its bits must be
//! those of the staged definition, computed here independently: every array
//! widened to f32, one plain f32 Adam step, then the parameter narrowed with
//! the scalar rounding (nearest, stochastic, Kahan) and the state to nearest.
//! Every length 0..=67, odd offsets, every backend and thread count, with
//! NaN, infinities and overflowing weights among the values.

use half::bf16;
use oxoptim_core::optimizer::with_bf16_state;
use oxoptim_core::rounding::{element_bits, kahan_bf16, stochastic_bf16, StreamKey};
use oxoptim_core::{
    adam_step, AdamConfig, ArraySpec, Backend, DType, DisjointMemo, Exec, ParamRounding, RawTensor,
    TensorBatch,
};

mod common;
use common::{adam_config, values, OFFSETS};

const SEED: u64 = 0x5eed;

/// Array `k` of slot `t`: values with specials (NaN and ±inf gradients,
/// weights near f32::MAX that overflow when rounded), second moments ≥ 0.
fn array(t: usize, k: usize, n: usize) -> Vec<f32> {
    values((t * 11 + k) as u64, n)
        .iter()
        .enumerate()
        .map(|(i, &x)| match (k, i % 23) {
            (0, 5) => 3.3e38f32.copysign(x as f32),
            (1, 7) => f32::NAN,
            (1, 11) => f32::INFINITY,
            (1, 13) => f32::NEG_INFINITY,
            (3 | 4, _) => (x * x * 0.01) as f32,
            (2, _) => (x * 0.1) as f32,
            _ => x as f32,
        })
        .collect()
}

/// One slot per length: `arity` arrays and a Kahan compensation, the
/// parameter and gradient float32 when `f32_params` (bfloat16 state), else
/// every array bfloat16; each starts `offset` elements into its buffer.
struct Slots {
    wide: Vec<Vec<f32>>,
    narrow: Vec<Vec<bf16>>,
    comp: Vec<Vec<bf16>>,
    lens: Vec<usize>,
    arity: usize,
    offset: usize,
    f32_params: bool,
}

impl Slots {
    fn new(lens: &[usize], arity: usize, offset: usize, f32_params: bool) -> Slots {
        let mut wide = Vec::new();
        let mut narrow = Vec::new();
        for (t, &n) in lens.iter().enumerate() {
            for k in 0..arity {
                let v = array(t, k, n + offset);
                narrow.push(v.iter().map(|&x| bf16::from_f32(x)).collect());
                wide.push(v);
            }
        }
        let comp = lens
            .iter()
            .map(|&n| {
                (0..n + offset)
                    .map(|i| bf16::from_f32(i as f32 * 1e-4))
                    .collect()
            })
            .collect();
        Slots {
            wide,
            narrow,
            comp,
            lens: lens.to_vec(),
            arity,
            offset,
            f32_params,
        }
    }

    fn is_f32(&self, k: usize) -> bool {
        self.f32_params && k < 2
    }

    /// The arrays under test as a batch (with compensation when `kahan`).
    fn batch(&mut self, kahan: bool) -> TensorBatch {
        let (offset, arity) = (self.offset, self.arity);
        let mut raws = Vec::new();
        for i in 0..self.lens.len() * arity {
            let len = self.lens[i / arity];
            raws.push(if self.is_f32(i % arity) {
                raw(
                    self.wide[i][offset..].as_mut_ptr() as usize,
                    len,
                    DType::F32,
                )
            } else {
                raw(
                    self.narrow[i][offset..].as_mut_ptr() as usize,
                    len,
                    DType::BF16,
                )
            });
        }
        let specs = if self.f32_params {
            with_bf16_state(&vec![ArraySpec::LIKE_PARAM; arity])
        } else {
            vec![ArraySpec::LIKE_PARAM; arity]
        };
        // SAFETY: the buffers outlive the batch and nothing else touches them.
        let batch =
            unsafe { TensorBatch::with_specs(raws, &specs, &mut DisjointMemo::default()).unwrap() };
        if !kahan {
            return batch;
        }
        let comp = (0..self.lens.len())
            .map(|t| {
                let (c, len) = (&mut self.comp[t], self.lens[t]);
                raw(c[offset..].as_mut_ptr() as usize, len, DType::BF16)
            })
            .collect();
        // SAFETY: as above.
        unsafe { batch.with_compensation(comp).unwrap() }
    }

    /// One step by the staged definition, on the scalar f32 path.
    fn reference_step(&mut self, config: &AdamConfig, step: f64, rounding: ParamRounding) {
        let arity = self.arity;
        let mut wide: Vec<Vec<f32>> = (0..self.narrow.len())
            .map(|i| {
                if self.is_f32(i % arity) {
                    self.wide[i].clone()
                } else {
                    self.narrow[i].iter().map(|x| x.to_f32()).collect()
                }
            })
            .collect();
        let raws = wide
            .iter_mut()
            .enumerate()
            .map(|(i, w)| {
                let len = self.lens[i / arity];
                raw(w[self.offset..].as_mut_ptr() as usize, len, DType::F32)
            })
            .collect();
        // SAFETY: `wide` outlives the batch.
        let batch = unsafe { TensorBatch::new(raws, arity).unwrap() };
        let steps = vec![step; self.lens.len()];
        adam_step(config, &batch, &steps, Exec::new(Backend::Scalar, 1)).unwrap();
        drop(batch);
        for (i, new) in wide.into_iter().enumerate() {
            let (t, k) = (i / arity, i % arity);
            if self.is_f32(k) {
                self.wide[i] = new;
                continue;
            }
            let old = &mut self.narrow[i];
            for (j, x) in new.iter().enumerate() {
                let index = j.wrapping_sub(self.offset); // element of the slot
                if j < self.offset || k == 1 {
                    continue; // outside the tensor; the gradient is read-only
                }
                old[j] = match (k, rounding) {
                    (0, ParamRounding::Stochastic { seed, count }) => {
                        let key = StreamKey::new(seed, count, t, 0);
                        bf16::from_bits(stochastic_bf16(*x, element_bits(index as u32, key)))
                    }
                    (0, ParamRounding::Kahan) => {
                        let (p, c) = kahan_bf16(old[j].to_f32(), *x, self.comp[t][j].to_f32());
                        self.comp[t][j] = c;
                        p
                    }
                    _ => bf16::from_f32(*x),
                };
            }
        }
    }

    fn bits(&self) -> Vec<Vec<u32>> {
        let wide = self
            .wide
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_f32(i % self.arity));
        wide.map(|(_, w)| w.iter().map(|x| x.to_bits()).collect())
            .chain(
                self.narrow
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !self.is_f32(i % self.arity))
                    .map(|(_, b)| b.iter().map(|x| x.to_bits() as u32).collect()),
            )
            .chain(
                self.comp
                    .iter()
                    .map(|b| b.iter().map(|x| x.to_bits() as u32).collect()),
            )
            .collect()
    }
}

fn raw(addr: usize, len: usize, dtype: DType) -> RawTensor {
    RawTensor { addr, len, dtype }
}

/// Three steps under test against three reference steps, compared after each.
fn check(lens: &[usize], f32_params: bool, rounding: ParamRounding, threads: &[usize]) {
    for (amsgrad, decoupled) in [(false, true), (true, false)] {
        let config = adam_config(amsgrad, decoupled);
        let arity = config.arity();
        for offset in OFFSETS {
            let mut want = Slots::new(lens, arity, offset, f32_params);
            let runs: Vec<(Backend, usize)> = Backend::supported()
                .into_iter()
                .flat_map(|b| threads.iter().map(move |&t| (b, t)))
                .collect();
            let mut got: Vec<Slots> = runs
                .iter()
                .map(|_| Slots::new(lens, arity, offset, f32_params))
                .collect();
            for s in 1..=3 {
                let rounding = match rounding {
                    ParamRounding::Stochastic { seed, .. } => {
                        ParamRounding::Stochastic { seed, count: s }
                    }
                    r => r,
                };
                want.reference_step(&config, s as f64, rounding);
                for (slots, &(backend, t)) in got.iter_mut().zip(&runs) {
                    let batch = slots.batch(rounding == ParamRounding::Kahan);
                    let exec = Exec::new(backend, t).with_rounding(rounding);
                    adam_step(&config, &batch, &vec![s as f64; lens.len()], exec).unwrap();
                    drop(batch);
                    assert!(
                        slots.bits() == want.bits(),
                        "{rounding:?} f32_params={f32_params} amsgrad={amsgrad} {backend:?} \
                         threads={t} offset={offset} step={s}"
                    );
                }
            }
        }
    }
}

const ROUNDINGS: [ParamRounding; 3] = [
    ParamRounding::Nearest,
    ParamRounding::Stochastic {
        seed: SEED,
        count: 0,
    },
    ParamRounding::Kahan,
];

#[test]
fn bf16_weights_fused_match_the_staged_definition_every_tail() {
    let lens: Vec<usize> = (0..=67).collect();
    for rounding in ROUNDINGS {
        check(&lens, false, rounding, &[1]);
    }
}

#[test]
fn bf16_state_fused_matches_the_staged_definition_every_tail() {
    let lens: Vec<usize> = (0..=67).collect();
    check(&lens, true, ParamRounding::Nearest, &[1]);
}

#[test]
fn fused_paths_do_not_depend_on_the_thread_count() {
    let lens = [100_003, 3, 1 << 16];
    for rounding in ROUNDINGS {
        check(&lens, false, rounding, &[1, 2, 3]);
    }
    check(&lens, true, ParamRounding::Nearest, &[1, 3]);
}
