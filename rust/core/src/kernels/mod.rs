//! Optimizer updates, each written once over [`crate::simd::Lanes`], and the
//! table of torch twins the Python bindings are generated from.

pub mod adadelta;
pub mod adagrad;
pub mod adam;
pub mod adam8bit;
pub mod adamax;
pub mod asgd;
pub mod averaging;
pub mod nadam;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod sgd;
pub mod subgradient;

use crate::dispatch::Element;
use crate::optimizer::{entry, Entry};
use crate::simd::Lanes;

/// Every optimizer, by name: adding one is its kernel file plus a row here.
/// All are torch twins except those whose `torch_twin` is false (8-bit state).
pub const OPTIMIZERS: &[Entry] = &[
    entry::<sgd::SgdConfig>(),
    entry::<adam::AdamConfig>(),
    entry::<rmsprop::RmspropConfig>(),
    entry::<adagrad::AdagradConfig>(),
    entry::<adamax::AdamaxConfig>(),
    entry::<nadam::NadamConfig>(),
    entry::<radam::RadamConfig>(),
    entry::<adadelta::AdadeltaConfig>(),
    entry::<asgd::AsgdConfig>(),
    entry::<rprop::RpropConfig>(),
    entry::<adam8bit::Adam8bitConfig>(),
];

/// Checks that `arrays` has exactly `expected` arrays of one common length and returns it.
fn common_len<T>(arrays: &[&mut [T]], expected: usize) -> usize {
    assert_eq!(
        arrays.len(),
        expected,
        "kernel received the wrong number of arrays"
    );
    let n = arrays[0].len();
    assert!(
        arrays.iter().all(|a| a.len() == n),
        "kernel arrays differ in length"
    );
    n
}

/// torch's `start.lerp_(end, weight)` for a scalar weight, as its CPU
/// kernel computes it: `start + w·(end − start)` when `|w| < 0.5`, else
/// `end + (w − 1)·(end − start)`, each one FMA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lerp<T> {
    coeff: T,
    from_start: bool,
}

impl<T: Element> Lerp<T> {
    pub(crate) fn new(weight: f64) -> Lerp<T> {
        let w = T::from_f64(weight);
        let from_start = w.abs() < T::from_f64(0.5);
        Lerp {
            coeff: if from_start { w } else { w - T::ONE },
            from_start,
        }
    }

    #[inline(always)]
    pub(crate) fn apply<S: Lanes<T>>(&self, s: S, start: S::V, end: S::V) -> S::V {
        let base = if self.from_start { start } else { end };
        s.mul_add(s.splat(self.coeff), s.sub(end, start), base)
    }
}

/// The gradient as torch's optimizers start from it: negated when
/// maximising, then `grad.add(param, alpha=weight_decay)` (one FMA) when the
/// decay is coupled and non-zero.
#[inline(always)]
pub(crate) fn decayed_grad<T: Element, S: Lanes<T>>(
    s: S,
    p: S::V,
    mut g: S::V,
    maximize: bool,
    weight_decay: Option<T>,
) -> S::V {
    if maximize {
        g = s.mul(g, s.splat(-T::ONE)); // exact negation, -0 included
    }
    if let Some(wd) = weight_decay {
        g = s.mul_add(p, s.splat(wd), g);
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{HyperKind, HyperValue};
    use crate::tensors::MAX_ARITY;

    /// Every key of a row's `HYPER`, at a value of its kind.
    fn sample_hyper(e: &Entry, flag: bool) -> Vec<(String, HyperValue)> {
        e.hyper
            .iter()
            .map(|(k, kind)| {
                let v = match kind {
                    HyperKind::Float => HyperValue::Float(0.5),
                    HyperKind::Flag => HyperValue::Flag(flag),
                    HyperKind::Pair => HyperValue::Pair(0.5, 1.5),
                };
                (k.to_string(), v)
            })
            .collect()
    }

    #[test]
    fn every_row_reads_exactly_its_declared_hyper_parameters() {
        for e in OPTIMIZERS {
            for flag in [false, true] {
                let configured = e
                    .configure(sample_hyper(e, flag))
                    .unwrap_or_else(|err| panic!("{}: {err}", e.name));
                let keys = configured.state_keys();
                assert!(
                    keys.iter().all(|k| e.state.contains(k)),
                    "{}: {keys:?}",
                    e.name
                );
                assert!(2 + keys.len() <= MAX_ARITY, "{}", e.name);
            }
            // Dropping any declared key is an error naming it.
            for (i, (key, _)) in e.hyper.iter().enumerate() {
                let mut h = sample_hyper(e, false);
                h.remove(i);
                let err = e
                    .configure(h)
                    .err()
                    .expect("missing key accepted")
                    .to_string();
                assert!(err.contains(key), "{}: {err}", e.name);
            }
        }
    }

    #[test]
    fn names_are_unique_and_lower_case() {
        for (i, e) in OPTIMIZERS.iter().enumerate() {
            assert_eq!(e.name, e.name.to_lowercase());
            assert!(
                OPTIMIZERS[..i].iter().all(|o| o.name != e.name),
                "{}",
                e.name
            );
        }
    }
}
