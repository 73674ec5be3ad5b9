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
//! kernels do, and in one contiguous piece per thread, as torch's
//! `parallel_for` splits a tensor. Every pattern runs in two layouts: arrays starting at the same
//! offset within a page (as large allocations come from the allocator) and
//! staggered by `STAGGER` elements per array (STREAM's OFFSET). In the first,
//! loads of one array alias stores to another in the low 12 address bits
//! ("4K aliasing"), which measured here halves the 4:3 mix; the kernels
//! being measured do not suffer it to that degree, so the ceiling is the
//! best of the four (layout × split). Prints one JSON object: best GB/s per
//! pattern over the four, and per layout; bytes counted as (R + W) · n · 4 per pass, i.e.
//! each array read or written once.
//!
//! usage: stream_probe ELEMENTS_PER_ARRAY THREADS REPS [READS:WRITES]
//! (with a mix, only that one runs: the per-round probe of `compare_torch.py`)

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

/// Elements between the starts of consecutive arrays in the staggered layout:
/// 1088 bytes, a multiple of the 64-byte line that is no multiple of 4096.
const STAGGER: usize = 272;

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

/// One timed pass of the pattern reading `reads` arrays of `len` elements on
/// `threads` threads, array k starting `k · stagger` elements into its
/// buffer; seconds.
fn timed_pass(buffers: &mut [Vec<f32>], len: usize, stagger: usize, chunk: usize, reads: usize, threads: usize) -> f64 {
    let mut ptrs = [std::ptr::null_mut(); 4];
    for (k, (p, b)) in ptrs.iter_mut().zip(buffers.iter_mut()).enumerate() {
        assert!(k * stagger + len <= b.len());
        // SAFETY: in bounds, checked above.
        *p = unsafe { b.as_mut_ptr().add(k * stagger) };
    }
    let view = Arrays { ptrs, len };
    let next = AtomicUsize::new(0);
    let work = || loop {
        let start = next.fetch_add(chunk, Ordering::Relaxed);
        if start >= view.len {
            break;
        }
        let end = (start + chunk).min(view.len);
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

const USAGE: &str = "usage: stream_probe ELEMENTS_PER_ARRAY THREADS REPS [READS:WRITES]";
const MIXES: [(usize, usize); 3] = [(2, 1), (3, 2), (4, 3)];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (numbers, mix) = match args.len() {
        3 => (&args[..], None),
        4 => (&args[..3], Some(args[3].as_str())),
        _ => panic!("{USAGE}"),
    };
    let numbers: Vec<usize> = numbers.iter().map(|a| a.parse().expect(USAGE)).collect();
    let [n, threads, reps] = numbers[..] else {
        panic!("{USAGE}");
    };
    let mixes: Vec<(usize, usize)> = match mix {
        None => MIXES.to_vec(),
        Some(m) => vec![*MIXES
            .iter()
            .find(|(r, w)| format!("{r}:{w}") == m)
            .unwrap_or_else(|| panic!("unknown mix {m}; {USAGE}"))],
    };
    let arrays = mixes.iter().map(|(r, _)| *r).max().unwrap_or(2);
    let threads = threads.max(1);
    // Written once (first touch) before any timing; distinct values per array.
    // Each layout with two ways of sharing the work: chunks of CHUNK taken in
    // turn (as the kernels' engine does), or one contiguous piece per thread
    // (as torch's parallel_for splits a tensor); fresh buffers for each.
    let per_thread = n.div_ceil(threads).max(1);
    let layouts = [
        ("aligned chunks", 0usize, CHUNK),
        ("aligned pieces", 0, per_thread),
        ("staggered chunks", STAGGER, CHUNK),
        ("staggered pieces", STAGGER, per_thread),
    ];
    let mut fields = Vec::new();
    let mut per_layout = Vec::new();
    let mut checksum = 0.0f64;
    let mut uniform = true;
    let mut best_gbps = vec![0.0f64; mixes.len()];
    for (name, stagger, chunk) in layouts {
        let mut buffers: Vec<Vec<f32>> = (0..arrays).map(|k| vec![1.0 / (k as f32 + 2.0); n + 3 * stagger]).collect();
        let mut layout_fields = Vec::new();
        for (i, &(reads, writes)) in mixes.iter().enumerate() {
            let best = (0..reps.max(1))
                .map(|_| timed_pass(&mut buffers, n, stagger, chunk, reads, threads))
                .fold(f64::INFINITY, f64::min);
            let gbps = ((reads + writes) * n * 4) as f64 / best / 1e9;
            best_gbps[i] = best_gbps[i].max(gbps);
            layout_fields.push(format!("\"{reads}:{writes}\": {gbps:.3}"));
        }
        per_layout.push(format!("\"{name}\": {{{}}}", layout_fields.join(", ")));
        // Keeps the results observable so no pass can be optimised away, and shows
        // every element went through every pass (all streamed elements of an array agree).
        for (k, b) in buffers.iter().enumerate() {
            let a = &b[k * stagger..k * stagger + n];
            checksum += a[n / 2] as f64;
            uniform &= a.iter().all(|x| *x == a[0]);
        }
    }
    for (i, (reads, writes)) in mixes.iter().enumerate() {
        fields.push(format!("\"{reads}:{writes}\": {:.3}", best_gbps[i]));
    }
    println!(
        "{{{}, \"layouts\": {{{}}}, \"checksum\": {checksum}, \"uniform\": {uniform}}}",
        fields.join(", "),
        per_layout.join(", ")
    );
}
