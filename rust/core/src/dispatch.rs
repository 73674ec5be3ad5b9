//! Runtime CPU dispatch, decided once per process.
//!
//! `OXOPTIM_SIMD=scalar|avx2|avx512|avx512vbmi|neon|auto` overrides the choice; a request
//! the CPU cannot run falls back to the best supported path below it.

use crate::simd::{Lanes, Real, Scalar};
use std::sync::OnceLock;

/// An instruction set a kernel can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    Scalar,
    Neon,
    Avx2,
    Avx512,
    /// AVX-512 with VBMI: the 8-bit coders use byte permutes
    /// ([`dispatch_codes`]); every other kernel runs as on [`Backend::Avx512`].
    Avx512Vbmi,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Neon => "neon",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
            Backend::Avx512Vbmi => "avx512vbmi",
        }
    }

    pub fn parse(name: &str) -> Option<Backend> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Backend::Scalar),
            "neon" => Some(Backend::Neon),
            "avx2" => Some(Backend::Avx2),
            "avx512" => Some(Backend::Avx512),
            "avx512vbmi" => Some(Backend::Avx512Vbmi),
            _ => None,
        }
    }

    /// Whether this CPU can run the backend.
    pub fn is_supported(self) -> bool {
        match self {
            Backend::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => crate::simd::x86::Avx2::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => crate::simd::x86::Avx512::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Vbmi => crate::simd::x86::Avx512Vbmi::try_new().is_some(),
            #[cfg(target_arch = "aarch64")]
            Backend::Neon => crate::simd::neon::Neon::try_new().is_some(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every backend this CPU supports, fastest last.
    pub fn supported() -> Vec<Backend> {
        [
            Backend::Scalar,
            Backend::Neon,
            Backend::Avx2,
            Backend::Avx512,
            Backend::Avx512Vbmi,
        ]
        .into_iter()
        .filter(|b| b.is_supported())
        .collect()
    }

    /// The backend used by default: chosen on first use, honouring `OXOPTIM_SIMD`.
    pub fn active() -> Backend {
        static ACTIVE: OnceLock<Backend> = OnceLock::new();
        *ACTIVE.get_or_init(|| choose(std::env::var("OXOPTIM_SIMD").ok().as_deref()))
    }
}

fn choose(request: Option<&str>) -> Backend {
    let supported = Backend::supported();
    let best = *supported.last().expect("scalar is always supported");
    match request.and_then(Backend::parse) {
        Some(wanted) => supported
            .into_iter()
            .filter(|b| *b <= wanted)
            .max()
            .unwrap_or(Backend::Scalar),
        None => best,
    }
}

/// A kernel body generic over the vector instruction set (pulp's `WithSimd`).
pub trait WithLanes<T: Real> {
    fn run<S: Lanes<T>>(&mut self, simd: S);
}

/// Element types every backend has vectors for.
pub trait Element: Real {
    /// Runs `body` with the vectors of `backend` (which must be supported; an
    /// unsupported one runs the scalar reference).
    fn dispatch<B: WithLanes<Self>>(backend: Backend, body: &mut B);
}

macro_rules! impl_element {
    ($t:ty) => {
        impl Element for $t {
            #[inline]
            fn dispatch<B: WithLanes<$t>>(backend: Backend, body: &mut B) {
                match backend {
                    #[cfg(target_arch = "x86_64")]
                    Backend::Avx512 | Backend::Avx512Vbmi => {
                        if let Some(simd) = crate::simd::x86::Avx512::try_new() {
                            return simd.enter(body);
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    Backend::Avx2 => {
                        if let Some(simd) = crate::simd::x86::Avx2::try_new() {
                            return simd.enter(body);
                        }
                    }
                    #[cfg(target_arch = "aarch64")]
                    Backend::Neon => {
                        if let Some(simd) = crate::simd::neon::Neon::try_new() {
                            return simd.enter(body);
                        }
                    }
                    _ => {}
                }
                body.run(Scalar)
            }
        }
    };
}
impl_element!(f32);
impl_element!(f64);

/// [`Element::dispatch`] for the 8-bit coding kernels, the only ones that
/// [`Backend::Avx512Vbmi`] runs differently (so that no other kernel is
/// compiled once more for it).
#[inline]
pub fn dispatch_codes<B: WithLanes<f32>>(backend: Backend, body: &mut B) {
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Avx512Vbmi {
        if let Some(simd) = crate::simd::x86::Avx512Vbmi::try_new() {
            return simd.enter(body);
        }
    }
    f32::dispatch(backend, body)
}

/// Runs `block` over `n` elements on `backend` (vectors, then a scalar tail).
///
/// # Safety
/// Every array `block` touches must hold at least `n` elements.
#[inline]
pub unsafe fn run_block<T: Element, B: crate::simd::LaneBlock<T>>(
    backend: Backend,
    n: usize,
    block: &mut B,
) {
    struct Runner<'a, B> {
        n: usize,
        block: &'a mut B,
    }
    impl<T: Element, B: crate::simd::LaneBlock<T>> WithLanes<T> for Runner<'_, B> {
        #[inline(always)]
        fn run<S: Lanes<T>>(&mut self, simd: S) {
            // SAFETY: forwarded from `run_block`'s contract.
            unsafe { crate::simd::run_blocks(simd, self.n, self.block) }
        }
    }
    T::dispatch(backend, &mut Runner { n, block })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_choice_never_exceeds_the_cpu() {
        assert_eq!(choose(Some("scalar")), Backend::Scalar);
        assert!(choose(Some("avx512")).is_supported());
        assert_eq!(choose(None), *Backend::supported().last().unwrap());
        assert_eq!(choose(Some("bogus")), choose(None));
    }
}
