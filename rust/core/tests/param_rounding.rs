//! bfloat16 parameters stored with stochastic rounding or Kahan compensation:
//! every SIMD path gives the scalar reference's bits, for every length
//! 0..=67, odd offsets and any thread count; stochastic rounding is unbiased
//! and stays between the two neighbours; refused settings write nothing.

use half::bf16;
use oxoptim_core::quant;
use oxoptim_core::rounding::{element_bits, narrow_stochastic, stochastic_bf16, StreamKey};
use oxoptim_core::{
    adam_step, sgd_step, AdamConfig, Backend, DType, DisjointMemo, Exec, HyperValue, ParamRounding,
    RawTensor, ScalarState, SgdConfig, TensorBatch, OPTIMIZERS,
};

mod common;
use common::{adam_config, check_all_backends, values, OFFSETS};

const SR: ParamRounding = ParamRounding::Stochastic {
    seed: 0x5eed,
    count: 0,
};

fn adamw() -> AdamConfig {
    adam_config(false, true)
}

fn stochastic(count: u64) -> ParamRounding {
    match SR {
        ParamRounding::Stochastic { seed, .. } => ParamRounding::Stochastic { seed, count },
        _ => unreachable!(),
    }
}

#[test]
fn narrowing_simd_matches_scalar_for_every_tail_offset_and_start() {
    for n in 0..=67usize {
        for offset in OFFSETS {
            // Starts near 2^32 cross the point where the stream key changes.
            for start in [0usize, 7, (1usize << 32) - 5] {
                let src: Vec<f32> = values(n as u64, n + offset)
                    .iter()
                    .map(|&v| v as f32 * 1.001)
                    .collect();
                let narrow = |backend| {
                    let mut dst = vec![bf16::ZERO; n + offset];
                    narrow_stochastic(
                        backend,
                        &src[offset..],
                        &mut dst[offset..],
                        start,
                        (9, 4),
                        2,
                    );
                    dst.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                let reference = narrow(Backend::Scalar);
                // The reference is the per-element formula.
                for (j, &bits) in reference[offset..].iter().enumerate() {
                    let index = start + j;
                    let key = StreamKey::new(9, 4, 2, (index as u64 >> 32) as u32);
                    let want = stochastic_bf16(src[offset + j], element_bits(index as u32, key));
                    assert_eq!(bits, want, "n={n} offset={offset} start={start} j={j}");
                }
                for backend in Backend::supported() {
                    assert_eq!(
                        narrow(backend),
                        reference,
                        "{backend:?} n={n} offset={offset} start={start}"
                    );
                }
            }
        }
    }
}

#[test]
fn adam_with_stochastic_rounding_simd_matches_scalar_every_tail() {
    let lens: Vec<usize> = (0..=67).collect();
    let slots = lens.len();
    check_all_backends::<bf16>(&lens, 4, &[3], &[1], |batch, s, exec| {
        let exec = exec.with_rounding(stochastic(s as u64));
        adam_step(&adamw(), batch, &vec![(s + 1) as f64; slots], exec).unwrap()
    });
}

#[test]
fn stochastic_rounding_never_depends_on_the_thread_count() {
    let lens = [200_003, 0, 70_001, 5, 1 << 16];
    let slots = lens.len();
    check_all_backends::<bf16>(&lens, 4, &[3], &[1, 2, 3, 7], |batch, s, exec| {
        let exec = exec.with_rounding(stochastic(s as u64));
        adam_step(&adamw(), batch, &vec![(s + 1) as f64; slots], exec).unwrap()
    });
}

#[test]
fn stochastic_rounding_is_unbiased_and_stays_between_neighbours() {
    // One value a quarter of the way between two bfloat16 numbers, rounded
    // by many elements and streams: the fraction rounded up is 1/4 within a
    // 5-sigma binomial bound, and nothing else comes out.
    let lo = bf16::from_f32(1.5);
    let hi = bf16::from_bits(lo.to_bits() + 1);
    let x = lo.to_f32() + 0.25 * (hi.to_f32() - lo.to_f32());
    let n = 1 << 14;
    let src = vec![x; n];
    let mut up = 0usize;
    let streams = 16;
    for count in 0..streams {
        let mut dst = vec![bf16::ZERO; n];
        narrow_stochastic(Backend::active(), &src, &mut dst, 0, (1, count), 0);
        for d in &dst {
            assert!(*d == lo || *d == hi, "{d}");
            up += (*d == hi) as usize;
        }
    }
    let trials = (n * streams as usize) as f64;
    let sigma = (trials * 0.25 * 0.75).sqrt();
    assert!(
        (up as f64 - 0.25 * trials).abs() < 5.0 * sigma,
        "{up} of {trials}"
    );
}

/// bfloat16 arrays `[param, grad, exp_avg, exp_avg_sq]` and a compensation per slot.
struct KahanArrays {
    buffers: Vec<Vec<bf16>>,
    comp: Vec<Vec<bf16>>,
    lens: Vec<usize>,
    offset: usize,
}

impl KahanArrays {
    fn new(lens: &[usize], offset: usize) -> KahanArrays {
        let mut buffers = Vec::new();
        for (t, &n) in lens.iter().enumerate() {
            for k in 0..4 {
                let v = values((t * 7 + k) as u64, n + offset);
                buffers.push(
                    v.iter()
                        .map(|&x| bf16::from_f64(if k == 3 { x.abs() } else { x }))
                        .collect(),
                );
            }
        }
        let comp = lens.iter().map(|&n| vec![bf16::ZERO; n + offset]).collect();
        KahanArrays {
            buffers,
            comp,
            lens: lens.to_vec(),
            offset,
        }
    }

    fn raw(offset: usize, b: &mut [bf16], len: usize) -> RawTensor {
        RawTensor {
            addr: b[offset..].as_mut_ptr() as usize,
            len,
            dtype: DType::BF16,
        }
    }

    fn batch(&mut self) -> TensorBatch {
        let (offset, lens) = (self.offset, self.lens.clone());
        let raws = self
            .buffers
            .iter_mut()
            .enumerate()
            .map(|(i, b)| Self::raw(offset, b, lens[i / 4]))
            .collect();
        let comp = self
            .comp
            .iter_mut()
            .enumerate()
            .map(|(i, b)| Self::raw(offset, b, lens[i]))
            .collect();
        // SAFETY: the buffers outlive the batch and nothing else touches them.
        unsafe {
            TensorBatch::new(raws, 4)
                .unwrap()
                .with_compensation(comp)
                .unwrap()
        }
    }

    fn bits(&self) -> Vec<Vec<u16>> {
        self.buffers
            .iter()
            .chain(&self.comp)
            .map(|b| b.iter().map(|x| x.to_bits()).collect())
            .collect()
    }
}

fn kahan_run(lens: &[usize], offset: usize, exec: Exec) -> Vec<Vec<u16>> {
    let mut a = KahanArrays::new(lens, offset);
    let batch = a.batch();
    for s in 0..3 {
        let steps = vec![(s + 1) as f64; lens.len()];
        adam_step(
            &adamw(),
            &batch,
            &steps,
            exec.with_rounding(ParamRounding::Kahan),
        )
        .unwrap();
    }
    drop(batch);
    a.bits()
}

#[test]
fn kahan_simd_matches_scalar_every_tail_and_thread_count() {
    let tails: Vec<usize> = (0..=67).collect();
    for offset in OFFSETS {
        let reference = kahan_run(&tails, offset, Exec::new(Backend::Scalar, 1));
        assert!(reference.iter().any(|b| b.iter().any(|&x| x != 0)));
        for backend in Backend::supported() {
            assert_eq!(
                kahan_run(&tails, offset, Exec::new(backend, 1)),
                reference,
                "{backend:?}"
            );
        }
    }
    let big = [100_003, 3, 1 << 16];
    let reference = kahan_run(&big, 1, Exec::new(Backend::Scalar, 1));
    for t in [2, 3, 7] {
        assert_eq!(
            kahan_run(&big, 1, Exec::new(Backend::active(), t)),
            reference
        );
    }
}

#[test]
fn kahan_compensation_is_what_the_parameter_misses() {
    // A tiny update on a large weight: round-to-nearest loses it every step,
    // Kahan keeps it in the compensation until the weight moves.
    let mut a = KahanArrays::new(&[64], 0);
    for x in a.buffers[0].iter_mut() {
        *x = bf16::from_f32(1.0);
    }
    for x in a.buffers[1].iter_mut() {
        *x = bf16::from_f32(1.0); // gradient: Adam moves each weight by lr
    }
    for k in [2, 3] {
        a.buffers[k].fill(bf16::ZERO); // fresh moments
    }
    let lr = 1e-3; // well below half an ulp of 1.0 in bfloat16 (2^-8)
    let config = AdamConfig {
        lr,
        weight_decay: 0.0,
        ..adamw()
    };
    let batch = a.batch();
    for s in 0..50 {
        adam_step(
            &config,
            &batch,
            &[(s + 1) as f64],
            Exec::default().with_rounding(ParamRounding::Kahan),
        )
        .unwrap();
    }
    drop(batch);
    for (p, c) in a.buffers[0].iter().zip(&a.comp[0]) {
        let total = p.to_f64() + c.to_f64();
        assert!((total - (1.0 - 50.0 * lr)).abs() < 2e-3, "{p} + {c}");
        assert!(p.to_f64() < 1.0, "the weight never moved: {p}");
    }
}

fn hyper() -> Vec<(String, HyperValue)> {
    vec![
        ("lr".into(), HyperValue::Float(0.1)),
        ("betas".into(), HyperValue::Pair(0.9, 0.999)),
        ("eps".into(), HyperValue::Float(1e-8)),
        ("weight_decay".into(), HyperValue::Float(0.0)),
        ("amsgrad".into(), HyperValue::Flag(false)),
        ("maximize".into(), HyperValue::Flag(false)),
        ("decoupled_weight_decay".into(), HyperValue::Flag(true)),
    ]
}

#[test]
fn refused_rounding_writes_nothing() {
    let adam = OPTIMIZERS.iter().find(|e| e.name == "adam").unwrap();
    let configured = adam.configure(hyper()).unwrap();
    // f32 parameters with stochastic rounding: an error, nothing written.
    let mut data = [vec![1.0f32; 8], vec![1.0; 8], vec![0.5; 8], vec![0.5; 8]];
    let mut step = [0.0f32];
    let raws = data
        .iter_mut()
        .map(|b| RawTensor {
            addr: b.as_mut_ptr() as usize,
            len: 8,
            dtype: DType::F32,
        })
        .collect();
    // SAFETY: the arrays outlive the batch and nothing else touches them.
    unsafe {
        let batch = TensorBatch::new(raws, 4).unwrap();
        let cell = RawTensor {
            addr: step.as_mut_ptr() as usize,
            len: 1,
            dtype: DType::F32,
        };
        let mut scalars = ScalarState::new(vec![cell], 1, &batch).unwrap();
        let err = adam
            .step(
                configured.as_ref(),
                &batch,
                &mut scalars,
                Exec::default().with_rounding(SR),
            )
            .unwrap_err();
        assert!(err.to_string().contains("bfloat16"), "{err}");
        // Kahan without compensation arrays: refused as well.
        let err = adam
            .step(
                configured.as_ref(),
                &batch,
                &mut scalars,
                Exec::default().with_rounding(ParamRounding::Kahan),
            )
            .unwrap_err();
        assert!(err.to_string().contains("compensation"), "{err}");
    }
    assert_eq!(step, [0.0]);
    assert!(data.iter().all(|b| b.iter().all(|&x| x == b[0])));
    assert_eq!(data[0][0], 1.0);
}

#[test]
fn compensation_must_fit_its_parameter() {
    let mut p = vec![bf16::ONE; 8];
    let mut g = vec![bf16::ONE; 8];
    let mut c = vec![0f32; 8];
    let raw = |addr: usize, dtype| RawTensor {
        addr,
        len: 8,
        dtype,
    };
    let (p_at, g_at) = (p.as_mut_ptr() as usize, g.as_mut_ptr() as usize);
    // SAFETY: the arrays outlive the batches, which are only checked.
    unsafe {
        let batch =
            || TensorBatch::new(vec![raw(p_at, DType::BF16), raw(g_at, DType::BF16)], 2).unwrap();
        let f32_comp = raw(c.as_mut_ptr() as usize, DType::F32);
        assert!(batch().with_compensation(vec![f32_comp]).is_err());
        let aliasing = raw(g_at, DType::BF16);
        assert!(batch().with_compensation(vec![aliasing]).is_err());
        assert!(batch().with_compensation(vec![]).is_err());
    }
}

#[test]
fn each_element_of_a_long_tensor_has_its_own_random_bits() {
    // SGD with lr 1 and gradient -2^-8 moves 1.0 exactly halfway to the next
    // bfloat16: the up/down pattern of one work chunk of the engine must not
    // repeat in the next, nor in another tensor of the call, nor at the next step.
    let chunk = oxoptim_core::engine::CHUNK;
    let n = 2 * chunk;
    let sgd = plain_sgd();
    let pattern = |count: u64| {
        let mut p = vec![vec![bf16::ONE; n]; 2];
        let mut g = vec![vec![bf16::from_f32(-1.0 / 256.0); n]; 2];
        let mut raws = Vec::new();
        for (p, g) in p.iter_mut().zip(g.iter_mut()) {
            for b in [p, g] {
                raws.push(RawTensor {
                    addr: b.as_mut_ptr() as usize,
                    len: n,
                    dtype: DType::BF16,
                });
            }
        }
        // SAFETY: the vectors outlive the batch and nothing else touches them.
        let batch = unsafe { TensorBatch::new(raws, 2).unwrap() };
        let exec = Exec::new(Backend::active(), 2).with_rounding(stochastic(count));
        sgd_step(&sgd, &batch, &[false, false], exec).unwrap();
        drop(batch);
        p.iter()
            .map(|t| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    let first = pattern(0);
    let ups = first[0]
        .iter()
        .filter(|&&b| b != bf16::ONE.to_bits())
        .count();
    assert!(ups > n / 3 && ups < 2 * n / 3, "{ups} of {n} rounded up");
    let (a, b) = first[0].split_at(chunk);
    assert_ne!(a, b, "chunks repeat the same bits");
    assert_ne!(first[0], first[1], "tensors repeat the same bits");
    assert_ne!(pattern(1), first, "steps repeat the same bits");
}

/// One 8-bit AdamW step set: parameters and gradients of type `P`, zero moments.
struct EightBit<P> {
    p: Vec<Vec<P>>,
    g: Vec<Vec<P>>,
    codes: Vec<[Vec<u8>; 2]>,
    absmax: Vec<[Vec<f32>; 2]>,
    step: Vec<f32>,
}

impl<P: Copy> EightBit<P> {
    fn new(lens: &[usize], to: impl Fn(f64) -> P) -> EightBit<P> {
        let zero = |map, n: usize| {
            let (mut c, mut a) = (vec![0u8; n], vec![0f32; n.div_ceil(quant::BLOCK)]);
            quant::quantize_blockwise(map, Backend::Scalar, &vec![0.0; n], &mut c, &mut a);
            (c, a)
        };
        let mut s = EightBit {
            p: vec![],
            g: vec![],
            codes: vec![],
            absmax: vec![],
            step: vec![0.0; lens.len()],
        };
        for (i, &n) in lens.iter().enumerate() {
            s.p.push(values(i as u64, n).into_iter().map(&to).collect());
            s.g.push(values(i as u64 + 99, n).into_iter().map(&to).collect());
            let (mc, ma) = zero(quant::Map::Signed, n);
            let (vc, va) = zero(quant::Map::Unsigned, n);
            s.codes.push([mc, vc]);
            s.absmax.push([ma, va]);
        }
        s
    }

    fn step(&mut self, dtype: DType, exec: Exec) -> oxoptim_core::Result<()> {
        let raw = |addr: usize, len: usize, dtype: DType| RawTensor { addr, len, dtype };
        let mut arrays = Vec::new();
        for i in 0..self.p.len() {
            let n = self.p[i].len();
            arrays.push(raw(self.p[i].as_mut_ptr() as usize, n, dtype));
            arrays.push(raw(self.g[i].as_mut_ptr() as usize, n, dtype));
            for c in self.codes[i].iter_mut() {
                arrays.push(raw(c.as_mut_ptr() as usize, n, DType::U8));
            }
            for a in self.absmax[i].iter_mut() {
                arrays.push(raw(a.as_mut_ptr() as usize, a.len(), DType::F32));
            }
        }
        let cells = (0..self.step.len())
            .map(|i| raw(&mut self.step[i] as *mut f32 as usize, 1, DType::F32))
            .collect();
        let entry = OPTIMIZERS.iter().find(|e| e.name == "adam8bit").unwrap();
        let configured = entry.configure(hyper_8bit()).unwrap();
        // SAFETY: the vectors outlive the batch and nothing else touches them meanwhile.
        unsafe {
            let batch = TensorBatch::with_specs(
                arrays,
                &configured.array_specs(),
                &mut DisjointMemo::default(),
            )?;
            let mut scalars = ScalarState::new(cells, 1, &batch)?;
            entry.step(configured.as_ref(), &batch, &mut scalars, exec)
        }
    }
}

fn hyper_8bit() -> Vec<(String, HyperValue)> {
    let mut h = hyper();
    h.retain(|(k, _)| !matches!(k.as_str(), "amsgrad" | "maximize"));
    h
}

#[test]
fn eight_bit_state_with_bf16_weights_is_the_f32_update_rounded() {
    let lens: Vec<usize> = (0..=67).chain([257, 70_001]).collect();
    let to_bf16 = |x: f64| bf16::from_f64(x);
    // The reference: the float32 8-bit step on the widened values.
    let mut wide = EightBit::new(&lens, |x| bf16::from_f64(x).to_f32());
    wide.step(DType::F32, Exec::new(Backend::Scalar, 1))
        .unwrap();
    let run = |rounding, exec: Exec| {
        let mut s = EightBit::new(&lens, to_bf16);
        s.step(DType::BF16, exec.with_rounding(rounding)).unwrap();
        s
    };
    let nearest = run(ParamRounding::Nearest, Exec::new(Backend::Scalar, 1));
    for (i, (p, w)) in nearest.p.iter().zip(&wide.p).enumerate() {
        let want: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(p, &want, "tensor {i}");
        assert_eq!(nearest.codes[i], wide.codes[i]);
        assert_eq!(nearest.absmax[i], wide.absmax[i]);
    }
    // Stochastic rounding: one of the two neighbours of the f32 update, the
    // same bits on every path and thread count.
    let reference = run(SR, Exec::new(Backend::Scalar, 1));
    let mut moved = 0;
    for (p, w) in reference.p.iter().zip(&wide.p) {
        for (&p, &w) in p.iter().zip(w) {
            let near = bf16::from_f32(w);
            let ok = if near.to_f32() == w {
                p == near
            } else {
                // The other neighbour: one step of magnitude towards w.
                let up = (near.to_f32() < w) == (w > 0.0);
                let other = bf16::from_bits(if up {
                    near.to_bits() + 1
                } else {
                    near.to_bits() - 1
                });
                p == near || p == other
            };
            assert!(ok, "{p} for {w}");
            moved += (p != bf16::from_f32(w)) as usize;
        }
    }
    assert!(moved > 0, "stochastic rounding never left round-to-nearest");
    for backend in Backend::supported() {
        for threads in [1, 2, 3] {
            let s = run(SR, Exec::new(backend, threads));
            assert!(
                s.p == reference.p && s.codes == reference.codes,
                "{backend:?} threads={threads}"
            );
        }
    }
    // Kahan is refused with 8-bit state, before anything is written.
    let mut s = EightBit::new(&[8], to_bf16);
    let before = s.p.clone();
    assert!(s
        .step(
            DType::BF16,
            Exec::default().with_rounding(ParamRounding::Kahan)
        )
        .is_err());
    assert_eq!((s.p, s.step), (before, vec![0.0]));
}

/// One buffer per length (`offset` extra elements in front), from `values`
/// seeded by the slot plus `seed`, mapped by `to`.
fn filled<T>(lens: &[usize], offset: usize, seed: u64, to: impl Fn(f64) -> T) -> Vec<Vec<T>> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            values(i as u64 + seed, n + offset)
                .into_iter()
                .map(&to)
                .collect()
        })
        .collect()
}

/// float32 weights and gradients, bfloat16 Adam moments, one slot per length.
fn bf16_state_run(lens: &[usize], offset: usize, exec: Exec) -> (Vec<Vec<u32>>, Vec<Vec<u16>>) {
    let mut p = filled(lens, offset, 0, |x| x as f32);
    let mut g = filled(lens, offset, 50, |x| x as f32);
    let mut m = filled(lens, offset, 70, |x| bf16::from_f64(x * 0.1));
    let mut v = filled(lens, offset, 90, |x| bf16::from_f64(x * x * 0.01));
    let mut arrays = Vec::new();
    for i in 0..lens.len() {
        let n = lens[i];
        let raw = |addr: usize, dtype| RawTensor {
            addr,
            len: n,
            dtype,
        };
        arrays.push(raw(p[i][offset..].as_mut_ptr() as usize, DType::F32));
        arrays.push(raw(g[i][offset..].as_mut_ptr() as usize, DType::F32));
        arrays.push(raw(m[i][offset..].as_mut_ptr() as usize, DType::BF16));
        arrays.push(raw(v[i][offset..].as_mut_ptr() as usize, DType::BF16));
    }
    let specs = oxoptim_core::optimizer::with_bf16_state(&[oxoptim_core::ArraySpec::LIKE_PARAM; 4]);
    // SAFETY: the vectors outlive the batch and nothing else touches them.
    let batch =
        unsafe { TensorBatch::with_specs(arrays, &specs, &mut DisjointMemo::default()).unwrap() };
    for s in 0..3 {
        adam_step(&adamw(), &batch, &vec![(s + 1) as f64; lens.len()], exec).unwrap();
    }
    drop(batch);
    let p = p
        .iter()
        .map(|x| x.iter().map(|y| y.to_bits()).collect())
        .collect();
    let state = m
        .iter()
        .chain(&v)
        .map(|x| x.iter().map(|y| y.to_bits()).collect())
        .collect();
    (p, state)
}

#[test]
fn bf16_state_simd_matches_scalar_every_tail_offset_and_thread_count() {
    let tails: Vec<usize> = (0..=67).collect();
    for offset in OFFSETS {
        let reference = bf16_state_run(&tails, offset, Exec::new(Backend::Scalar, 1));
        for backend in Backend::supported() {
            assert!(
                bf16_state_run(&tails, offset, Exec::new(backend, 1)) == reference,
                "{backend:?} offset={offset}"
            );
        }
    }
    let big = [100_003, 3, 1 << 16];
    let reference = bf16_state_run(&big, 1, Exec::new(Backend::Scalar, 1));
    for t in [2, 3, 7] {
        assert!(
            bf16_state_run(&big, 1, Exec::new(Backend::active(), t)) == reference,
            "threads={t}"
        );
    }
}

#[test]
fn nearest_narrowing_and_widening_match_half_on_every_path() {
    use oxoptim_core::rounding::{narrow_bf16, widen_bf16};
    let specials = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // a signalling NaN with its payload in the low bits
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,                        // subnormal
        1.0 + f32::EPSILON * 32768.0, // a tie between two bfloat16 numbers
        1.0 + f32::EPSILON * 98304.0, // the next tie
    ];
    for n in 0..=67usize {
        for offset in OFFSETS {
            let mut src: Vec<f32> = values(n as u64 + 500, n + offset)
                .iter()
                .map(|&x| x as f32 * 3.3)
                .collect();
            for (i, x) in specials.iter().enumerate() {
                if offset + i < src.len() {
                    src[offset + i] = *x;
                }
            }
            let want: Vec<u16> = src[offset..]
                .iter()
                .map(|&x| bf16::from_f32(x).to_bits())
                .collect();
            for backend in Backend::supported() {
                let mut dst = vec![bf16::ZERO; n + offset];
                narrow_bf16(backend, &src[offset..], &mut dst[offset..]);
                let got: Vec<u16> = dst[offset..].iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "{backend:?} n={n} offset={offset}");
                let mut back = vec![0f32; n + offset];
                widen_bf16(backend, &dst[offset..], &mut back[offset..]);
                for (b, d) in back[offset..].iter().zip(&dst[offset..]) {
                    assert_eq!(b.to_bits(), d.to_f32().to_bits(), "{backend:?}");
                }
            }
        }
    }
}

#[test]
fn a_tensors_random_bits_follow_its_stream_id_not_its_slot() {
    // Halfway cases (as above), so every element's rounding shows its bits.
    let sgd = plain_sgd();
    let n = 777;
    let run = |tensors: usize, streams: Option<Vec<u64>>| {
        let mut p = vec![vec![bf16::ONE; n]; tensors];
        let mut g = vec![vec![bf16::from_f32(-1.0 / 256.0); n]; tensors];
        let mut raws = Vec::new();
        for (p, g) in p.iter_mut().zip(g.iter_mut()) {
            for b in [p, g] {
                raws.push(RawTensor {
                    addr: b.as_mut_ptr() as usize,
                    len: n,
                    dtype: DType::BF16,
                });
            }
        }
        // SAFETY: the vectors outlive the batch and nothing else touches them.
        let mut batch = unsafe { TensorBatch::new(raws, 2).unwrap() };
        if let Some(ids) = streams {
            batch = batch.with_streams(ids).unwrap();
        }
        let exec = Exec::new(Backend::active(), 2).with_rounding(stochastic(3));
        sgd_step(&sgd, &batch, &vec![false; tensors], exec).unwrap();
        drop(batch);
        p.last()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    let second_of_two = run(2, Some(vec![5, 9]));
    assert_eq!(run(1, Some(vec![9])), second_of_two, "stream 9 alone");
    assert_ne!(run(1, None), second_of_two, "slot 0's stream");
    assert_eq!(
        run(2, None),
        run(1, Some(vec![1])),
        "the default stream is the slot index"
    );
    let mut short = vec![bf16::ONE; 4];
    // SAFETY: `short` outlives the batch.
    let batch = unsafe { one_short_slot(&mut short) };
    assert!(matches!(
        batch.with_streams(vec![1, 2]),
        Err(oxoptim_core::Error::Mismatch(_))
    ));
}

#[test]
fn pieces_of_a_tensor_with_their_offsets_draw_the_whole_tensors_bits() {
    // Halfway cases, so every element's rounding shows its bits; the 8-bit
    // kernel takes the same offsets (tests/test_rows.py steps it in pieces).
    let sgd = plain_sgd();
    let n = 1000;
    // `cuts` split the tensor into pieces, each a slot of one batch with its offset.
    let run = |cuts: &[usize], offsets: bool| {
        let mut p = vec![bf16::ONE; n];
        let mut g = vec![bf16::from_f32(-1.0 / 256.0); n];
        let mut raws = Vec::new();
        let mut starts = Vec::new();
        for w in cuts.windows(2) {
            for b in [&mut p, &mut g] {
                raws.push(RawTensor {
                    addr: b[w[0]..].as_mut_ptr() as usize,
                    len: w[1] - w[0],
                    dtype: DType::BF16,
                });
            }
            starts.push(w[0] as u64);
        }
        let slots = starts.len();
        // SAFETY: the vectors outlive the batch and its pieces are disjoint.
        let mut batch = unsafe { TensorBatch::new(raws, 2).unwrap() }
            .with_streams(vec![4; slots])
            .unwrap();
        if offsets {
            batch = batch.with_offsets(starts).unwrap();
        }
        let exec = Exec::new(Backend::active(), 2).with_rounding(stochastic(3));
        sgd_step(&sgd, &batch, &vec![false; slots], exec).unwrap();
        drop(batch);
        p.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    let whole = run(&[0, n], false);
    assert_eq!(run(&[0, 1, 17, 300, 301, n], true), whole);
    assert_ne!(
        run(&[0, 300, n], false),
        whole,
        "without offsets a piece restarts the stream"
    );
    let mut short = vec![bf16::ONE; 4];
    // SAFETY: `short` outlives both batches.
    let batch = unsafe { one_short_slot(&mut short) };
    assert!(matches!(
        batch.with_offsets(vec![1, 2]),
        Err(oxoptim_core::Error::Mismatch(_))
    ));
    // SAFETY: as above.
    let batch = unsafe { one_short_slot(&mut short) };
    assert!(matches!(
        batch.with_offsets(vec![u64::MAX - 1]),
        Err(oxoptim_core::Error::Mismatch(_))
    ));
}

/// A batch of one slot (parameter and gradient, 2 elements each) in `short` (4 elements).
///
/// # Safety
/// `short` must outlive the batch.
unsafe fn one_short_slot(short: &mut [bf16]) -> TensorBatch {
    let raw = RawTensor {
        addr: short.as_mut_ptr() as usize,
        len: 2,
        dtype: DType::BF16,
    };
    let other = RawTensor {
        addr: short[2..].as_mut_ptr() as usize,
        ..raw
    };
    TensorBatch::new(vec![raw, other], 2).unwrap()
}

/// SGD with lr 1 and nothing else: the update is the gradient itself.
fn plain_sgd() -> SgdConfig {
    SgdConfig {
        lr: 1.0,
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    }
}
