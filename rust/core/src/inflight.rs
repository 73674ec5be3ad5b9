//! Native calls in flight: a process-wide registry of the memory each one
//! reads and writes. A call that would write memory another call in flight
//! touches, or read memory another call in flight writes, is refused before
//! it touches anything ([`Error::Busy`]) instead of racing: two optimizers,
//! or an optimizer and an averager, stepping the same tensors from two
//! threads on the native path get an error, not torn values or a broken
//! aliasing guarantee. A step that runs torch's implementation (a fallback)
//! is not registered: it races as torch's own optimizers do.
//!
//! Cost with nothing else in flight: one lock and a push, then a lock and a
//! removal. Only when calls overlap in time are their address ranges compared
//! (one sort of both footprints).

use crate::error::{Error, Result};
use crate::tensors::{RawTensor, ScalarState, TensorBatch, MAX_ARITY};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What one call reads and writes: the arrays of a batch (written or only
/// read, by position within a slot) and the scalar state cells it writes.
#[derive(Debug)]
pub struct Footprint {
    batch: Arc<TensorBatch>,
    written: [bool; MAX_ARITY],
    cells: Vec<RawTensor>,
}

impl Footprint {
    /// `written[k]`: whether array `k` of every slot is written (one flag per
    /// position of the batch's arity; all false for a read-only batch).
    pub fn new(batch: &Arc<TensorBatch>, written: &[bool]) -> Result<Footprint> {
        if written.len() != batch.arity() {
            return Err(Error::Mismatch(format!(
                "{} write flags for {} arrays per tensor",
                written.len(),
                batch.arity()
            )));
        }
        if batch.is_read_only() && written.contains(&true) {
            return Err(Error::Mismatch(
                "a read-only batch cannot be written".to_string(),
            ));
        }
        let mut flags = [false; MAX_ARITY];
        flags[..written.len()].copy_from_slice(written);
        Ok(Footprint {
            batch: batch.clone(),
            written: flags,
            cells: Vec::new(),
        })
    }

    /// Adds the scalar state cells (step counters, ...), which the call writes.
    pub fn with_scalars(mut self, scalars: &ScalarState) -> Footprint {
        self.cells = scalars.cells().to_vec();
        self
    }

    /// Every non-empty byte range touched: `(start, end, written)`.
    fn spans(&self) -> impl Iterator<Item = (usize, usize, bool)> + '_ {
        let arity = self.batch.arity();
        let arrays = self
            .batch
            .arrays()
            .iter()
            .enumerate()
            .filter(|(_, a)| a.len > 0)
            .map(move |(i, a)| {
                let (start, end) = a.byte_range();
                (start, end, self.written[i % arity])
            });
        let counters = self.cells.iter().chain(self.batch.compensation()).map(|c| {
            let (start, end) = c.byte_range();
            (start, end, true)
        });
        arrays.chain(counters)
    }
}

/// A registered call; dropping it (after the call returned, or while a
/// panicking kernel unwinds) removes its footprint.
#[derive(Debug)]
#[must_use = "the footprint is released as soon as the guard is dropped"]
pub struct InFlight {
    id: u64,
}

static CALLS: Mutex<Vec<(u64, Footprint)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn calls() -> MutexGuard<'static, Vec<(u64, Footprint)>> {
    // The list stays consistent even if a holder panicked: no invariant spans the lock.
    CALLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers a call about to run, or refuses it when it conflicts with a call
/// in flight (which, the GIL aside, can only be one on another thread).
pub fn enter(footprint: Footprint) -> Result<InFlight> {
    let mut calls = calls();
    if !calls.is_empty() {
        check_conflicts(&footprint, calls.iter().map(|(_, f)| f))?;
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    calls.push((id, footprint));
    Ok(InFlight { id })
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut calls = calls();
        if let Some(i) = calls.iter().position(|(id, _)| *id == self.id) {
            calls.swap_remove(i);
        }
    }
}

/// Number of calls in flight now, in any thread (for tests and diagnostics).
pub fn calls_in_flight() -> usize {
    calls().len()
}

/// Sweeps all ranges in address order: a range of the new call conflicts
/// with an earlier-starting range of another call that it starts inside of,
/// when either writes (and the other way round).
fn check_conflicts<'a>(new: &Footprint, others: impl Iterator<Item = &'a Footprint>) -> Result<()> {
    let mut spans: Vec<(usize, usize, bool, bool)> = new
        .spans()
        .map(|(s, e, w)| (s, e, w, true))
        .chain(
            others
                .flat_map(|f| f.spans())
                .map(|(s, e, w)| (s, e, w, false)),
        )
        .collect();
    spans.sort_unstable_by_key(|s| s.0);
    // Furthest end so far of any range / of a written range, per side [others, new].
    let mut any_end = [0usize; 2];
    let mut write_end = [0usize; 2];
    for (start, end, write, mine) in spans {
        let (me, other) = (mine as usize, !mine as usize);
        let clash_end = if write {
            any_end[other]
        } else {
            write_end[other]
        };
        if start < clash_end {
            let (this, that) = match (mine, write) {
                (true, true) => ("write", "using"),
                (true, false) => ("read", "writing"),
                (false, true) => ("use", "writing"),
                (false, false) => ("write", "reading"),
            };
            return Err(Error::Busy(format!(
                "this call would {this} tensor memory at {start:#x} that another oxoptim call \
                 in flight on another thread is {that}: two optimizers (or an optimizer and an \
                 averager) must not update the same tensors at the same time"
            )));
        }
        any_end[me] = any_end[me].max(end);
        if write {
            write_end[me] = write_end[me].max(end);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::{DType, RawTensor};

    fn t(addr: usize, len: usize) -> RawTensor {
        RawTensor {
            addr,
            len,
            dtype: DType::F32,
        }
    }

    fn batch(arrays: Vec<RawTensor>, arity: usize) -> Arc<TensorBatch> {
        // SAFETY: these batches are only registered, never turned into slices.
        Arc::new(unsafe { TensorBatch::new(arrays, arity) }.unwrap())
    }

    fn read_only(arrays: Vec<RawTensor>) -> Arc<TensorBatch> {
        // SAFETY: as above.
        Arc::new(unsafe { TensorBatch::new_read_only(arrays, 1) }.unwrap())
    }

    // Every case runs in one test: the registry is process-wide and the test
    // harness runs tests on parallel threads.
    #[test]
    fn conflicts_are_refused_and_released() {
        // [param, grad] at 0x1000.. and 0x2000..; param written, grad read.
        let a = batch(vec![t(0x1000, 16), t(0x2000, 16)], 2);
        let held = enter(Footprint::new(&a, &[true, false]).unwrap()).unwrap();
        let busy = |arrays: Vec<RawTensor>, arity, written: &[bool]| {
            let b = batch(arrays, arity);
            matches!(
                enter(Footprint::new(&b, written).unwrap()),
                Err(Error::Busy(_))
            )
        };
        // Writing what `a` writes, or reads; reading what `a` writes.
        assert!(busy(vec![t(0x1020, 4)], 1, &[true]));
        assert!(busy(vec![t(0x2000, 4)], 1, &[true]));
        assert!(busy(vec![t(0x0ff0, 8)], 1, &[false])); // straddles the start of a's param
        let ro = read_only(vec![t(0x1000, 1), t(0x1000, 1)]);
        assert!(matches!(
            enter(Footprint::new(&ro, &[false]).unwrap()),
            Err(Error::Busy(_))
        ));
        // Reading what `a` only reads, touching memory right after, or elsewhere: fine.
        let ok = |arrays: Vec<RawTensor>, arity, written: &[bool]| {
            let b = batch(arrays, arity);
            enter(Footprint::new(&b, written).unwrap()).is_ok()
        };
        assert!(ok(vec![t(0x2000, 16)], 1, &[false]));
        assert!(ok(vec![t(0x1040, 4), t(0x3000, 4)], 2, &[true, true]));
        // Empty arrays touch nothing.
        assert!(ok(vec![t(0x1000, 0)], 1, &[true]));
        // Scalar state cells are written.
        let c = batch(vec![t(0x5000, 4), t(0x6000, 4)], 2);
        // SAFETY: registered only.
        let scalars = unsafe { ScalarState::new(vec![t(0x2004, 1)], 1, &c) }.unwrap();
        let with_counters = Footprint::new(&c, &[true, false])
            .unwrap()
            .with_scalars(&scalars);
        assert!(matches!(enter(with_counters), Err(Error::Busy(_))));
        // Refused calls were never registered and `held` is released on drop
        // (no other unit test of this crate registers calls).
        assert_eq!(calls_in_flight(), 1);
        drop(held);
        assert_eq!(calls_in_flight(), 0);
        assert!(ok(vec![t(0x1000, 16)], 1, &[true]));
    }

    #[test]
    fn footprint_flags_must_fit_the_batch() {
        let a = batch(vec![t(0x1000, 4), t(0x2000, 4)], 2);
        assert!(matches!(
            Footprint::new(&a, &[true]),
            Err(Error::Mismatch(_))
        ));
        let ro = read_only(vec![t(0x1000, 4)]);
        assert!(matches!(
            Footprint::new(&ro, &[true]),
            Err(Error::Mismatch(_))
        ));
    }
}
