//! Criterion benches: every kernel, scalar reference vs the dispatched SIMD
//! path, single-threaded, reporting bytes/s of memory traffic (each array
//! read once, each written array written once).
//! Also the 8-bit coders on every path and the cost of the in-flight registry
//! per native call (`in_flight`).
//! Run: `cargo bench -p oxoptim-core` (set OXOPTIM_BENCH_MAX to cap the size;
//! `-- 8bit` for the 8-bit coders alone, `-- adam8bit` for the 8-bit AdamW
//! step beside its parts, `-- in_flight` for the registry).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oxoptim_core::kernels::adam8bit::Adam8bitConfig;
use oxoptim_core::optimizer::{find, Optimizer};
use oxoptim_core::quant::{self, Map};
use oxoptim_core::{
    accumulate_mean, adam_step, inflight, lerp_average, reduce, scale_into, sgd_step,
    subgradient_step, AdamConfig, Backend, DType, DisjointMemo, Exec, Footprint, RawTensor,
    Reduction, ScalarState, SgdConfig, SubgradientConfig, TensorBatch, OPTIMIZERS,
};
use std::hint::black_box;
use std::sync::Arc;

fn sizes() -> Vec<usize> {
    let max: usize = std::env::var("OXOPTIM_BENCH_MAX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000_000);
    [1_000, 100_000, 10_000_000, 100_000_000]
        .into_iter()
        .filter(|&n| n <= max)
        .collect()
}

/// `arity` f32 arrays of `n` elements, as one tensor slot.
fn arrays(n: usize, arity: usize) -> Vec<Vec<f32>> {
    (0..arity)
        .map(|k| {
            (0..n)
                .map(|i| ((i * 7 + k) % 13) as f32 * 0.01 + 0.01)
                .collect()
        })
        .collect()
}

fn batch(bufs: &mut [Vec<f32>]) -> TensorBatch {
    let arity = bufs.len();
    slots(bufs, arity)
}

/// `bufs` as slots of `arity` arrays each.
fn slots(bufs: &mut [Vec<f32>], arity: usize) -> TensorBatch {
    let raws = bufs
        .iter_mut()
        .map(|b| RawTensor {
            addr: b.as_mut_ptr() as usize,
            len: b.len(),
            dtype: DType::F32,
        })
        .collect();
    // SAFETY: the buffers outlive the batch and nothing else touches them.
    unsafe { TensorBatch::new(raws, arity).unwrap() }
}

/// Bytes moved per step: `arrays_moved` array passes (reads plus writes) of `n` f32.
fn traffic(n: usize, arrays_moved: usize) -> u64 {
    (n * 4 * arrays_moved) as u64
}

/// Benches `step` on slots of `arity` arrays, counting `arrays_moved` passes of memory traffic.
fn bench_kernel(
    c: &mut Criterion,
    name: &str,
    arity: usize,
    arrays_moved: usize,
    step: impl Fn(&TensorBatch, Exec),
) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    for n in sizes() {
        let mut bufs = arrays(n, arity);
        let b = batch(&mut bufs);
        group.throughput(Throughput::Bytes(traffic(n, arrays_moved)));
        for backend in [Backend::Scalar, Backend::active()] {
            group.bench_with_input(BenchmarkId::new(backend.name(), n), &n, |bench, _| {
                bench.iter(|| step(black_box(&b), Exec::new(backend, 1)))
            });
        }
    }
    group.finish();
}

/// The AdamW settings every Adam bench uses.
fn adamw() -> AdamConfig {
    AdamConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        amsgrad: false,
        maximize: false,
        decoupled_weight_decay: true,
    }
}

fn kernels(c: &mut Criterion) {
    let sgd = SgdConfig {
        lr: 1e-3,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 1e-4,
        nesterov: false,
        maximize: false,
    };
    bench_kernel(c, "sgd_momentum", sgd.arity(), 5, |b, exec| {
        sgd_step(&sgd, b, &[false], exec).unwrap()
    });
    let adam = adamw();
    bench_kernel(c, "adamw", adam.arity(), 7, |b, exec| {
        adam_step(&adam, b, &[10.0], exec).unwrap()
    });
    let sub = SubgradientConfig {
        step: 1e-3,
        l1: 1e-4,
        weight_decay: 1e-4,
        maximize: false,
    };
    // Subgradient: read p, g; write p.
    bench_kernel(c, "subgradient", 2, 3, |b, exec| {
        subgradient_step(&sub, b, exec).unwrap()
    });
    // Gradient accumulation (running mean, grad cleared): read mean, g; write mean, g.
    bench_kernel(c, "accumulate_mean", 2, 4, |b, exec| {
        accumulate_mean(b, 0.25, false, true, exec).unwrap()
    });
    // EMA/SWA averaging: read avg, p; write avg.
    bench_kernel(c, "lerp_average", 2, 3, |b, exec| {
        lerp_average(b, 1e-3, exec).unwrap()
    });
    // Scaling in place (gradient clipping, write-back): read and write one array.
    bench_kernel(c, "scale", 1, 2, |b, exec| {
        scale_into(b, 0.5, exec).unwrap()
    });
    // Reductions (clip_grad_norm_, skip_nonfinite): read one array.
    bench_kernel(c, "sum_squares", 1, 1, |b, exec| {
        black_box(reduce(Reduction::SumSquares, b, exec).unwrap());
    });
    bench_kernel(c, "any_nonfinite", 1, 1, |b, exec| {
        black_box(reduce(Reduction::AnyNonfinite, b, exec).unwrap());
    });
}

/// A batch of `tensors` Adam slots (`[param, grad, exp_avg, exp_avg_sq]`, 16
/// elements each) over `bufs`, with its step counters (one cell per tensor
/// in `steps`); the registry's cost does not depend on sizes.
fn adam_group(bufs: &mut [Vec<f32>], steps: &mut [f32]) -> (Arc<TensorBatch>, ScalarState) {
    let batch = slots(bufs, 4);
    let cells = steps
        .iter_mut()
        .map(|s| RawTensor {
            addr: s as *mut f32 as usize,
            len: 1,
            dtype: DType::F32,
        })
        .collect();
    // SAFETY: the counters outlive the state and nothing else touches them.
    let scalars = unsafe { ScalarState::new(cells, 1, &batch).unwrap() };
    (Arc::new(batch), scalars)
}

/// What an optimizer step registers (`rust/python/src/generic.rs`): its
/// arrays, the gradient only read, and its step counters, which are written.
fn footprint(batch: &Arc<TensorBatch>, scalars: &ScalarState) -> Footprint {
    Footprint::new(batch, &[true, false, true, true])
        .unwrap()
        .with_scalars(scalars)
}

/// The in-flight registry around one optimizer step: register the call's
/// footprint, release it. Alone, it is a lock and a push/pop plus a copy of
/// the counters' descriptions; with another call in flight the two
/// footprints' ranges are compared.
fn in_flight(c: &mut Criterion) {
    let mut group = c.benchmark_group("in_flight");
    let mut mine: Vec<Vec<f32>> = (0..4 * 2000).map(|_| vec![0.0; 16]).collect();
    let mut theirs: Vec<Vec<f32>> = (0..4 * 2000).map(|_| vec![0.0; 16]).collect();
    let (mut my_steps, mut their_steps) = (vec![0f32; 2000], vec![0f32; 2000]);
    let mut bench =
        |name: &str, tensors: usize, (batch, scalars): (Arc<TensorBatch>, ScalarState)| {
            group.bench_function(BenchmarkId::new(name, tensors), |b| {
                b.iter(|| {
                    drop(black_box(
                        inflight::enter(footprint(&batch, &scalars)).unwrap(),
                    ))
                })
            });
        };
    for tensors in [1usize, 2000] {
        let alone = adam_group(&mut mine[..4 * tensors], &mut my_steps[..tensors]);
        bench("alone", tensors, alone);
    }
    // Registered only now: the benches above ran with nothing else in flight.
    let (other, other_steps) = adam_group(&mut theirs, &mut their_steps);
    let held = inflight::enter(footprint(&other, &other_steps)).unwrap();
    bench(
        "beside another call",
        2000,
        adam_group(&mut mine, &mut my_steps),
    );
    drop(held);
    group.finish();
}

/// 8-bit block-wise coding on every path this CPU has (the byte-permute
/// one among them): signed map, f32 in, u8 out (quantising also copies its
/// input once) and back.
fn codes(c: &mut Criterion) {
    for (name, quantize) in [("quantize_8bit", true), ("dequantize_8bit", false)] {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for n in sizes().into_iter().filter(|&n| n <= 10_000_000) {
            let values: Vec<f32> = arrays(n, 1).remove(0).iter().map(|x| x - 0.07).collect();
            let mut codes = vec![0u8; n];
            let mut absmax = vec![0f32; n.div_ceil(quant::BLOCK)];
            let mut out = vec![0f32; n];
            quant::quantize_blockwise(
                Map::Signed,
                Backend::Scalar,
                &values,
                &mut codes,
                &mut absmax,
            );
            group.throughput(Throughput::Bytes((n * 5) as u64));
            for backend in Backend::supported() {
                group.bench_with_input(BenchmarkId::new(backend.name(), n), &n, |bench, _| {
                    bench.iter(|| {
                        if quantize {
                            let v = black_box(&values);
                            quant::quantize_blockwise(
                                Map::Signed,
                                backend,
                                v,
                                &mut codes,
                                &mut absmax,
                            )
                        } else {
                            let c = black_box(&codes);
                            quant::dequantize_blockwise(Map::Signed, backend, c, &absmax, &mut out)
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

/// Where an 8-bit AdamW step's time goes, one thread, per element: the
/// whole step (`[param, grad, m codes, v codes, m absmax, v absmax]`) beside
/// the fp32 AdamW step on as many elements and the coders alone (each copies
/// its input once). In cache (100,000 elements) it is the arithmetic; at 10M
/// the memory too. Throughput counts elements, not bytes.
fn adam8bit(c: &mut Criterion) {
    let adam = adamw();
    let config = Adam8bitConfig { adam };
    let entry = find(OPTIMIZERS, "adam8bit").unwrap();
    let mut group = c.benchmark_group("adam8bit");
    group.sample_size(10);
    for n in sizes()
        .into_iter()
        .filter(|&n| (100_000..=10_000_000).contains(&n))
    {
        group.throughput(Throughput::Elements(n as u64));
        let blocks = n.div_ceil(quant::BLOCK);
        let mut f32s = arrays(n, 2);
        let (mut m, mut v) = (vec![0u8; n], vec![0u8; n]);
        let (mut ma, mut va) = (vec![0f32; blocks], vec![0f32; blocks]);
        let mut step = 0f32;
        let raw = |addr: usize, len: usize, dtype: DType| RawTensor { addr, len, dtype };
        let arrays8 = vec![
            raw(f32s[0].as_mut_ptr() as usize, n, DType::F32),
            raw(f32s[1].as_mut_ptr() as usize, n, DType::F32),
            raw(m.as_mut_ptr() as usize, n, DType::U8),
            raw(v.as_mut_ptr() as usize, n, DType::U8),
            raw(ma.as_mut_ptr() as usize, blocks, DType::F32),
            raw(va.as_mut_ptr() as usize, blocks, DType::F32),
        ];
        // SAFETY: the buffers outlive the batch and nothing else touches them.
        let batch8 = unsafe {
            TensorBatch::with_specs(arrays8, &config.array_specs(), &mut DisjointMemo::default())
                .unwrap()
        };
        let cells = vec![raw(&mut step as *mut f32 as usize, 1, DType::F32)];
        // SAFETY: the counter outlives the state and is not in the batch.
        let mut scalars = unsafe { ScalarState::new(cells, 1, &batch8).unwrap() };
        let mut fp32 = arrays(n, 4);
        let batch32 = batch(&mut fp32);
        let values: Vec<f32> = arrays(n, 1).remove(0).iter().map(|x| x - 0.07).collect();
        let mut codes = vec![0u8; n];
        let mut absmax = vec![0f32; blocks];
        let mut out = vec![0f32; n];
        let backend = Backend::active();
        let exec = Exec::new(backend, 1);
        group.bench_with_input(BenchmarkId::new("adamw8bit step", n), &n, |b, _| {
            b.iter(|| entry.step(&config, &batch8, &mut scalars, exec).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("adamw fp32 step", n), &n, |b, _| {
            b.iter(|| adam_step(&adam, black_box(&batch32), &[10.0], exec).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("quantize", n), &n, |b, _| {
            b.iter(|| {
                quant::quantize_blockwise(
                    Map::Signed,
                    backend,
                    black_box(&values),
                    &mut codes,
                    &mut absmax,
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("dequantize", n), &n, |b, _| {
            b.iter(|| {
                quant::dequantize_blockwise(
                    Map::Signed,
                    backend,
                    black_box(&codes),
                    &absmax,
                    &mut out,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernels, codes, adam8bit, in_flight);
criterion_main!(benches);
