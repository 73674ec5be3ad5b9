//! Criterion benches: every kernel, scalar reference vs the dispatched SIMD
//! path, single-threaded, reporting bytes/s of memory traffic.
//! Run: `cargo bench -p oxoptim-core` (set OXOPTIM_BENCH_MAX to cap the size).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oxoptim_core::{
    adam_step, sgd_step, AdamConfig, Backend, DType, Exec, RawTensor, SgdConfig, TensorBatch,
};
use std::hint::black_box;

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
    let raws = bufs
        .iter_mut()
        .map(|b| RawTensor {
            addr: b.as_mut_ptr() as usize,
            len: b.len(),
            dtype: DType::F32,
        })
        .collect();
    // SAFETY: the buffers outlive the batch and nothing else touches them.
    unsafe { TensorBatch::new(raws, bufs.len()).unwrap() }
}

/// Bytes moved per element: every array is read, all but the gradient written.
fn traffic(n: usize, arity: usize) -> u64 {
    (n * 4 * (2 * arity - 1)) as u64
}

fn bench_kernel(c: &mut Criterion, name: &str, arity: usize, step: impl Fn(&TensorBatch, Exec)) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    for n in sizes() {
        let mut bufs = arrays(n, arity);
        let b = batch(&mut bufs);
        group.throughput(Throughput::Bytes(traffic(n, arity)));
        for backend in [Backend::Scalar, Backend::active()] {
            group.bench_with_input(BenchmarkId::new(backend.name(), n), &n, |bench, _| {
                bench.iter(|| step(black_box(&b), Exec::new(backend, 1)))
            });
        }
    }
    group.finish();
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
    bench_kernel(c, "sgd_momentum", sgd.arity(), |b, exec| {
        sgd_step(&sgd, b, &[false], exec).unwrap()
    });
    let adam = AdamConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        amsgrad: false,
        maximize: false,
        decoupled_weight_decay: true,
    };
    bench_kernel(c, "adamw", adam.arity(), |b, exec| {
        adam_step(&adam, b, &[10.0], exec).unwrap()
    });
}

criterion_group!(benches, kernels);
criterion_main!(benches);
