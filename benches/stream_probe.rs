//! Streaming-bandwidth probe with the optimizers' stream mixes (a STREAM-like
//! kernel, std only). Built and run by `benches/bandwidth.py` with
//! `rustc -C opt-level=3 -C target-cpu=native`; not part of the cargo workspace.
//!
//! Each pattern reads R arrays and writes W of them back in place, in one pass,
//! with one multiply-add per written element, so it is bound by memory traffic
//! only:
//!   2:1  a = a·c + b                              (plain SGD, Subgradient, EMA)
//!   3:2  m = m·c + g; p = p·c + m                 (SGD with momentum)
//!   4:3  m = m·c + g; v = v·c + g; p = p·c + m + v (Adam, AdamW)
//! Threads take chunks of 32768 elements from a shared counter, as the
//! kernels do. Prints one JSON object: best GB/s per pattern, bytes counted as
//! (R + W) · n · 4 per pass, i.e. each array read or written once.
//!
//! usage: stream_probe ELEMENTS_PER_ARRAY THREADS REPS

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

const C: f32 = 0.999;

fn pass_2_1(a: &mut [f32], b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a = *a * C + *b;
    }
}

fn pass_3_2(p: &mut [f32], m: &mut [f32], g: &[f32]) {
    for ((p, m), g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
        *m = *m * C + *g;
        *p = *p * C + *m;
    }
}

fn pass_4_3(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    for (((p, m), v), g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        *m = *m * C + *g;
        *v = *v * C + *g;
        *p = *p * C + *m + *v;
    }
}

/// Elements per work item, as the kernels' engine (and torch's `parallel_for`
/// grain) hand out: threads take the next chunk from a shared counter, so they
/// stream neighbouring memory as the optimizers do.
const CHUNK: usize = 1 << 15;

/// Raw view of the arrays a pass touches; threads write disjoint chunks.
#[derive(Clone, Copy)]
struct Arrays {
    ptrs: [*mut f32; 4],
    len: usize,
}

// SAFETY: every thread works on chunks no other thread touches (see `timed_pass`).
unsafe impl Send for Arrays {}
unsafe impl Sync for Arrays {}

impl Arrays {
    /// # Safety
    /// No other thread may access `start..end` of these arrays meanwhile.
    unsafe fn chunk(&self, k: usize, start: usize, end: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.ptrs[k].add(start), end - start)
    }
}

/// One timed pass of the pattern reading `reads` arrays on `threads` threads; seconds.
fn timed_pass(arrays: &mut [Vec<f32>], reads: usize, threads: usize) -> f64 {
    let len = arrays[0].len();
    let mut ptrs = [std::ptr::null_mut(); 4];
    for (p, a) in ptrs.iter_mut().zip(arrays.iter_mut()) {
        *p = a.as_mut_ptr();
    }
    let view = Arrays { ptrs, len };
    let next = AtomicUsize::new(0);
    let work = || loop {
        let start = next.fetch_add(CHUNK, Ordering::Relaxed);
        if start >= view.len {
            break;
        }
        let end = (start + CHUNK).min(view.len);
        // SAFETY: each chunk index is taken by exactly one thread, and the
        // arrays are distinct allocations of `len` elements.
        unsafe {
            match reads {
                2 => pass_2_1(view.chunk(0, start, end), view.chunk(1, start, end)),
                3 => pass_3_2(view.chunk(0, start, end), view.chunk(1, start, end), view.chunk(2, start, end)),
                _ => pass_4_3(
                    view.chunk(0, start, end),
                    view.chunk(1, start, end),
                    view.chunk(2, start, end),
                    view.chunk(3, start, end),
                ),
            }
        }
    };
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: stream_probe ELEMENTS_PER_ARRAY THREADS REPS"))
        .collect();
    let [n, threads, reps] = args[..] else {
        panic!("usage: stream_probe ELEMENTS_PER_ARRAY THREADS REPS");
    };
    let threads = threads.max(1);
    // Written once (first touch) before any timing; distinct values per array.
    let mut arrays: Vec<Vec<f32>> = (0..4).map(|k| vec![1.0 / (k as f32 + 2.0); n]).collect();
    let mut fields = Vec::new();
    for (reads, writes) in [(2usize, 1usize), (3, 2), (4, 3)] {
        let best = (0..reps.max(1))
            .map(|_| timed_pass(&mut arrays, reads, threads))
            .fold(f64::INFINITY, f64::min);
        let gbps = ((reads + writes) * n * 4) as f64 / best / 1e9;
        fields.push(format!("\"{reads}:{writes}\": {gbps:.3}"));
    }
    // Keeps the results observable so no pass can be optimised away, and shows
    // every element went through every pass (all elements of an array agree).
    let checksum: f64 = arrays.iter().map(|a| a[n / 2] as f64).sum();
    let uniform = arrays.iter().all(|a| a.iter().all(|x| *x == a[0]));
    println!("{{{}, \"checksum\": {checksum}, \"uniform\": {uniform}}}", fields.join(", "));
}
