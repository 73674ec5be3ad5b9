//! Optimizer updates, each written once over [`crate::simd::Lanes`], and the
//! table of torch twins the Python bindings are generated from.

pub mod adadelta;
pub mod adafactor;
pub mod adagrad;
pub mod adam;
pub mod adam8bit;
pub mod adamax;
pub mod asgd;
pub mod averaging;
pub mod declare;
mod eight_bit;
pub mod lion;
pub mod nadam;
pub mod prodigy;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod schedule_free;
pub mod sgd;
pub mod sgd8bit;
mod sqrt_over;
pub mod stream_probe;
pub mod subgradient;

/// `x ** 0.5` as torch's Python code computes it: the C library's `pow`. A literal
/// `x.powf(0.5)` is turned into a square root by LLVM, which is correctly rounded where
/// glibc's `pow` is not always (a last-bit difference at some steps of float64 Adam).
#[inline]
pub(crate) fn py_pow_half(x: f64) -> f64 {
    x.powf(std::hint::black_box(0.5))
}

use crate::dispatch::Element;
use crate::optimizer::{entry, Entry};
use crate::simd::Lanes;

/// Every optimizer, by name: adding one is its kernel file plus a row here.
/// All are twins (of a torch.optim class or of a reference package on PyPI) except those whose
/// `torch_twin` is false (8-bit state, which has no twin to match bit for bit).
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
    entry::<adafactor::AdafactorConfig>(),
    entry::<lion::LionConfig>(),
    entry::<schedule_free::AdamwScheduleFreeConfig>(),
    entry::<schedule_free::SgdScheduleFreeConfig>(),
    entry::<prodigy::ProdigyConfig>(),
    entry::<adam8bit::Adam8bitConfig>(),
    entry::<sgd8bit::Sgd8bitConfig>(),
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

/// torch's Adam-family start of a step, shared by NAdam and RAdam: the
/// (maximised, coupled-decayed) gradient, the decoupled decay of the
/// parameter, then `exp_avg.lerp_(g, 1 − β1)` and
/// `exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2)` (one FMA, as torch's
/// CPU `addcmul`), both stored.
#[derive(Clone, Copy)]
pub(crate) struct AdamMoments<T> {
    exp_avg_lerp: Lerp<T>,
    beta2: SecondMoment<T>,
    coupled_decay: Option<T>,
    /// `1 - lr * weight_decay` when the decay is decoupled.
    param_decay: Option<T>,
    maximize: bool,
}

/// The [`AdamSettings`] of a settings struct that has fields of these names
/// (NAdam's, RAdam's).
macro_rules! adam_settings {
    ($c:expr) => {
        $crate::kernels::AdamSettings {
            beta1: $c.beta1,
            beta2: $c.beta2,
            lr: $c.lr,
            weight_decay: $c.weight_decay,
            decoupled_weight_decay: $c.decoupled_weight_decay,
            maximize: $c.maximize,
        }
    };
}
pub(crate) use adam_settings;

/// The settings an [`AdamMoments`] is built from.
pub(crate) struct AdamSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
}

/// The values of one step after the moments are updated.
pub(crate) struct Moments<V> {
    pub param: V,
    pub grad: V,
    pub exp_avg: V,
    pub exp_avg_sq: V,
}

impl<T: Element> AdamMoments<T> {
    pub(crate) fn new(c: AdamSettings) -> AdamMoments<T> {
        let decay = c.weight_decay != 0.0;
        AdamMoments {
            exp_avg_lerp: Lerp::new(1.0 - c.beta1),
            beta2: SecondMoment::new(c.beta2),
            coupled_decay: (decay && !c.decoupled_weight_decay)
                .then(|| T::from_f64(c.weight_decay)),
            param_decay: (decay && c.decoupled_weight_decay)
                .then(|| T::from_f64(1.0 - c.lr * c.weight_decay)),
            maximize: c.maximize,
        }
    }

    /// Loads `[param, grad, exp_avg, exp_avg_sq]`, updates and stores both moments.
    ///
    /// # Safety
    /// Those four arrays are valid for `S::WIDTH` elements at their pointers.
    #[inline(always)]
    pub(crate) unsafe fn update<S: Lanes<T>>(
        &self,
        s: S,
        [param, grad, exp_avg, exp_avg_sq, ..]: declare::Arrays<T>,
    ) -> Moments<S::V> {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let mut p = s.load(param);
            let g = decayed_grad(s, p, s.load(grad), self.maximize, self.coupled_decay);
            if let Some(decay) = self.param_decay {
                p = s.mul(p, s.splat(decay));
            }
            let m = self.exp_avg_lerp.apply(s, s.load(exp_avg), g);
            s.store(exp_avg, m);
            let v = self.beta2.update(s, exp_avg_sq, g);
            Moments {
                param: p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
            }
        }
    }
}

/// `exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2)`: torch's CPU
/// `addcmul` is one FMA, `fma(value·g, g, self)`.
#[derive(Clone, Copy)]
pub(crate) struct SecondMoment<T> {
    beta2: T,
    one_minus_beta2: T,
}

impl<T: Element> SecondMoment<T> {
    pub(crate) fn new(beta2: f64) -> SecondMoment<T> {
        SecondMoment {
            beta2: T::from_f64(beta2),
            one_minus_beta2: T::from_f64(1.0 - beta2),
        }
    }

    /// Updates and stores element `i` of `exp_avg_sq`; returns it.
    ///
    /// # Safety
    /// `exp_avg_sq .. + S::WIDTH` must be in bounds.
    #[inline(always)]
    pub(crate) unsafe fn update<S: Lanes<T>>(&self, s: S, exp_avg_sq: *mut T, g: S::V) -> S::V {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let v = s.mul(s.load(exp_avg_sq), s.splat(self.beta2));
            let v = s.mul_add(s.mul(s.splat(self.one_minus_beta2), g), g, v);
            s.store(exp_avg_sq, v);
            v
        }
    }
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

    #[test]
    fn half_powers_are_the_c_librarys_pow_as_in_python() {
        extern "C" {
            fn pow(x: f64, y: f64) -> f64;
        }
        // Adam's bias corrections over long runs, and parameter sizes (Adafactor's numel ** 0.5):
        // glibc's pow differs from the square root for some (step 1270 with beta2 = 0.999).
        let inputs = (1..40_000)
            .map(|t| 1.0 - 0.999f64.powf(t as f64))
            .chain((1..20_000).map(|n| n as f64));
        let mut differs_from_sqrt = 0;
        for x in inputs {
            // SAFETY: the C library's pow is defined for every double.
            let expected = unsafe { pow(std::hint::black_box(x), std::hint::black_box(0.5)) };
            assert_eq!(py_pow_half(x).to_bits(), expected.to_bits(), "{x:e}");
            differs_from_sqrt += usize::from(expected != x.sqrt());
        }
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(
                differs_from_sqrt > 0,
                "glibc's pow equals sqrt on these: the test checks nothing"
            );
        }
    }
}
