//! Kernel workers on torch's own OpenMP team.
//!
//! torch's CPU ops run on libgomp threads that keep spinning for a while
//! after each op; a separate pool started right after backward() would share
//! the cores with those spinners. When torch's libgomp is loaded (it is, with
//! torch imported) the engine runs its workers through `GOMP_parallel`
//! instead, like torch's own `at::parallel_for`. `OXOPTIM_PARALLEL=rayon`
//! keeps the built-in pool.

use oxoptim_core::set_parallel_for;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

type GompParallel =
    unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type OmpGetThreadNum = unsafe extern "C" fn() -> c_int;

#[derive(Clone, Copy)]
struct Gomp {
    parallel: GompParallel,
    thread_num: OmpGetThreadNum,
}

static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();

#[cfg(target_os = "linux")]
fn lookup() -> Option<Gomp> {
    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    // glibc's RTLD_DEFAULT: search every library already loaded globally.
    let default = std::ptr::null_mut();
    // SAFETY: dlsym only reads the NUL-terminated names; a non-null result is
    // the address of the libgomp entry point with the C signature declared
    // above (part of libgomp's stable GOMP_4.0 / OMP_1.0 ABI).
    unsafe {
        let parallel = dlsym(default, c"GOMP_parallel".as_ptr());
        let thread_num = dlsym(default, c"omp_get_thread_num".as_ptr());
        if parallel.is_null() || thread_num.is_null() {
            return None;
        }
        Some(Gomp {
            parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
            thread_num: std::mem::transmute::<*mut c_void, OmpGetThreadNum>(thread_num),
        })
    }
}

#[cfg(not(target_os = "linux"))]
fn lookup() -> Option<Gomp> {
    None
}

/// The worker team in use: "openmp" (torch's) or "rayon".
pub(crate) fn install() -> &'static str {
    let gomp = GOMP.get_or_init(|| {
        let wanted = std::env::var("OXOPTIM_PARALLEL")
            .map_or(true, |v| v.trim().eq_ignore_ascii_case("openmp"));
        let found = if wanted { lookup() } else { None };
        if found.is_some() {
            set_parallel_for(openmp_parallel_for);
        }
        found
    });
    if gomp.is_some() {
        "openmp"
    } else {
        "rayon"
    }
}

struct Team<'a> {
    job: &'a (dyn Fn(usize) + Sync),
    thread_num: OmpGetThreadNum,
    panicked: AtomicBool,
}

unsafe extern "C" fn run_member(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `openmp_parallel_for` keeps alive
    // until GOMP_parallel returns, after every member finished.
    let team = unsafe { &*(data as *const Team<'_>) };
    // SAFETY: called inside the parallel region, as OpenMP requires.
    let id = unsafe { (team.thread_num)() } as usize;
    // A panic must not unwind into C: record it and re-raise after the region.
    if catch_unwind(AssertUnwindSafe(|| (team.job)(id))).is_err() {
        team.panicked.store(true, Ordering::Relaxed);
    }
}

fn openmp_parallel_for(threads: usize, job: &(dyn Fn(usize) + Sync)) {
    let gomp = GOMP
        .get()
        .copied()
        .flatten()
        .expect("installed only after libgomp was found");
    let team = Team {
        job,
        thread_num: gomp.thread_num,
        panicked: AtomicBool::new(false),
    };
    let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
    // SAFETY: `run_member` matches GOMP_parallel's callback type and `team`
    // outlives the call, which returns only when the whole team is done.
    unsafe {
        (gomp.parallel)(
            run_member,
            &team as *const Team<'_> as *mut c_void,
            threads,
            0,
        )
    };
    if team.panicked.load(Ordering::Relaxed) {
        panic!("an oxoptim kernel worker panicked");
    }
}
