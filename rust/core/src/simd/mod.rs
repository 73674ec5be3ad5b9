//! A tiny portable-SIMD layer in the style of pulp: kernels are written once,
//! generic over [`Lanes`], and instantiated for each instruction set.
//!
//! Every implementation performs the *same* IEEE operations per lane (a fused
//! multiply-add is a real FMA everywhere, the scalar one via `mul_add`), so a
//! SIMD path gives results bit-identical to the scalar reference.

/// Declares a vector path's token from the one list of CPU features its code
/// is compiled with: `try_new` detects every feature of the list at run time,
/// and `enter` runs a kernel body inside a function compiled with a
/// `target_feature` attribute for each of the same features, so what
/// is detected and what the compiler may emit cannot drift apart. Only this
/// macro writes `target_feature` attributes (`tests/cpu_features.rs` checks).
macro_rules! cpu_path {
    ($(#[$doc:meta])* $token:ident, detect = $detect:ident, features = [$($feature:tt),+ $(,)?]) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $token {
            _private: (),
        }

        impl $token {
            /// Every CPU feature this path is compiled with, each detected by `try_new`.
            pub const FEATURES: &'static [&'static str] = &[$($feature),+];

            /// The token, when the CPU has every feature in [`Self::FEATURES`].
            pub fn try_new() -> Option<Self> {
                // Detected once: kernels ask for every block of a few hundred elements.
                static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                SUPPORTED
                    .get_or_init(|| {
                        Self::supported_by(|feature| match feature {
                            $($feature => std::arch::$detect!($feature),)+
                            _ => false,
                        })
                    })
                    .then_some($token { _private: () })
            }

            /// Whether a CPU that has exactly the features `has` answers true
            /// for can run this path (what `try_new` asks of the real CPU).
            pub fn supported_by(has: impl Fn(&str) -> bool) -> bool {
                Self::FEATURES.iter().all(|feature| has(feature))
            }

            /// Runs `body` on this path's vectors.
            #[inline]
            pub fn enter<T: Real, B: crate::dispatch::WithLanes<T>>(self, body: &mut B)
            where
                Self: Lanes<T>,
            {
                $(#[target_feature(enable = $feature)])+
                unsafe fn entry<T: Real, B: crate::dispatch::WithLanes<T>>(simd: $token, body: &mut B)
                where
                    $token: Lanes<T>,
                {
                    body.run(simd)
                }
                // SAFETY: a token exists only after `try_new` detected every
                // feature of `FEATURES`, the list `entry` is compiled with.
                unsafe { entry(self, body) }
            }
        }
    };
}

#[cfg(target_arch = "aarch64")]
pub mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_vbmi;

pub use scalar::Scalar;

/// Element types the arithmetic kernels compute in.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Rounds a hyper-parameter (computed in f64) to this type, as torch casts
    /// a Python scalar to the tensor's dtype.
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn mul_add(self, b: Self, c: Self) -> Self {
                <$t>::mul_add(self, b, c)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// One instruction set's vector registers for element type `T`.
///
/// All methods are `#[inline(always)]` in the implementations: they are only
/// ever called from inside a function compiled with the matching
/// `#[target_feature]`, where they inline to single instructions.
pub trait Lanes<T: Real>: Copy + Send + Sync + 'static {
    type V: Copy;
    /// Number of `T` lanes in `V`.
    const WIDTH: usize;

    fn splat(self, x: T) -> Self::V;
    /// # Safety
    /// `ptr` must be valid for reading `WIDTH` elements (no alignment needed).
    unsafe fn load(self, ptr: *const T) -> Self::V;
    /// # Safety
    /// `ptr` must be valid for writing `WIDTH` elements (no alignment needed).
    unsafe fn store(self, ptr: *mut T, v: Self::V);
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    fn sqrt(self, a: Self::V) -> Self::V;
    /// `a * b + c` with a single rounding.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise maximum that propagates NaN, like `torch.maximum`.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Absolute value (clears the sign bit; NaN stays NaN).
    fn abs(self, a: Self::V) -> Self::V;
    /// `1` where `a > 0`, `-1` where `a < 0`, `+0` otherwise (zeros and NaN).
    fn sign(self, a: Self::V) -> Self::V;
    /// `then` where `a < b`, `otherwise` where not (NaN compares false).
    fn lt_select(self, a: Self::V, b: Self::V, then: Self::V, otherwise: Self::V) -> Self::V;
    /// Sum of squares accumulated lane-wise: `acc + x * x` with one rounding.
    #[inline(always)]
    fn square_acc(self, acc: Self::V, x: Self::V) -> Self::V {
        self.mul_add(x, x, acc)
    }
    /// Adds the lanes in a fixed order (lane 0 first), for deterministic reductions.
    fn reduce_sum(self, v: Self::V) -> T;
    /// True when any lane is NaN or infinite.
    fn any_nonfinite(self, v: Self::V) -> bool;

    /// Dequantises `WIDTH` 8-bit codes: `book.values[code] * scale` per lane
    /// (one rounding, as [`crate::quant::Codebook::dequantize`]).
    ///
    /// # Safety
    /// `codes` must be valid for reading `WIDTH` bytes.
    #[inline(always)]
    unsafe fn dequantize(
        self,
        codes: *const u8,
        book: &crate::quant::Codebook,
        scale: T,
    ) -> Self::V {
        let mut lanes = [T::ZERO; MAX_WIDTH];
        for (i, lane) in lanes[..Self::WIDTH].iter_mut().enumerate() {
            // SAFETY: i < WIDTH, within the caller's guarantee.
            let code = unsafe { *codes.add(i) };
            *lane = T::from_f64(book.values[code as usize] as f64) * scale;
        }
        // SAFETY: `lanes` holds at least WIDTH elements.
        unsafe { self.load(lanes.as_ptr()) }
    }

    /// Values [`Self::quantize_many`] and [`Self::dequantize_many`] take at a time.
    const CODE_RUN: usize = Self::WIDTH;

    /// `out[i] = book.dequantize(codes[i], scale)` for `n` codes, `n` a
    /// multiple of [`Self::CODE_RUN`].
    ///
    /// # Safety
    /// `codes` must be readable and `out` writable for `n` elements.
    #[inline(always)]
    unsafe fn dequantize_many(
        self,
        codes: *const u8,
        n: usize,
        book: &crate::quant::Codebook,
        scale: T,
        out: *mut T,
    ) {
        for i in (0..n).step_by(Self::WIDTH) {
            // SAFETY: i + WIDTH <= n, within the caller's guarantee.
            unsafe { self.store(out.add(i), self.dequantize(codes.add(i), book, scale)) };
        }
    }

    /// `out[i] = book.quantize(src[i] * inv)` for `n` values, `n` a multiple
    /// of [`Self::CODE_RUN`].
    ///
    /// # Safety
    /// `src` must be readable and `out` writable for `n` elements.
    #[inline(always)]
    unsafe fn quantize_many(
        self,
        src: *const T,
        n: usize,
        inv: T,
        book: &crate::quant::Codebook,
        out: *mut u8,
    ) {
        for i in (0..n).step_by(Self::WIDTH) {
            // SAFETY: i + WIDTH <= n, within the caller's guarantee.
            unsafe {
                let x = self.mul(self.load(src.add(i)), self.splat(inv));
                self.quantize(x, book, out.add(i));
            }
        }
    }

    /// `max(acc, |x|)` lane-wise, NaN kept (any payload): the step of
    /// [`crate::quant::absmax`].
    #[inline(always)]
    fn max_magnitude(self, acc: Self::V, x: Self::V) -> Self::V {
        self.max(acc, self.abs(x))
    }

    /// Writes the 8-bit codes of the `WIDTH` normalised values of `x`, lane
    /// by lane what [`crate::quant::Codebook::quantize`] gives.
    ///
    /// # Safety
    /// `out` must be valid for writing `WIDTH` bytes.
    #[inline(always)]
    unsafe fn quantize(self, x: Self::V, book: &crate::quant::Codebook, out: *mut u8) {
        let mut lanes = [T::ZERO; MAX_WIDTH];
        // SAFETY: `lanes` holds at least WIDTH elements; i < WIDTH for `out`.
        unsafe {
            self.store(lanes.as_mut_ptr(), x);
            for (i, lane) in lanes[..Self::WIDTH].iter().enumerate() {
                *out.add(i) = book.quantize(lane.to_f64() as f32);
            }
        }
    }
    /// `WIDTH` bfloat16 values (as bits) widened exactly.
    ///
    /// # Safety
    /// `src` must be valid for reading `WIDTH` u16 values.
    #[inline(always)]
    unsafe fn widen_bf16(self, src: *const u16) -> Self::V {
        let mut lanes = [T::ZERO; MAX_WIDTH];
        for (i, lane) in lanes[..Self::WIDTH].iter_mut().enumerate() {
            // SAFETY: i < WIDTH, within the caller's guarantee.
            let bits = unsafe { *src.add(i) };
            *lane = T::from_f64(half::bf16::from_bits(bits).to_f64());
        }
        // SAFETY: `lanes` holds at least WIDTH elements.
        unsafe { self.load(lanes.as_ptr()) }
    }

    /// Writes the `WIDTH` lanes of `x` as bfloat16 bits rounded to nearest
    /// even, as `half::bf16::from_f32` (NaN keeps its sign and payload, quieted).
    ///
    /// # Safety
    /// `out` must be valid for writing `WIDTH` u16 values.
    #[inline(always)]
    unsafe fn narrow_bf16_nearest(self, x: Self::V, out: *mut u16) {
        let mut lanes = [T::ZERO; MAX_WIDTH];
        // SAFETY: `lanes` holds at least WIDTH elements; i < WIDTH for `out`.
        unsafe {
            self.store(lanes.as_mut_ptr(), x);
            for (i, lane) in lanes[..Self::WIDTH].iter().enumerate() {
                *out.add(i) = half::bf16::from_f32(lane.to_f64() as f32).to_bits();
            }
        }
    }

    /// `x` rounded to the nearest bfloat16 (ties to even) and widened back,
    /// lane by lane [`crate::rounding::nearest_bf16_f32`] (NaN quieted).
    #[inline(always)]
    fn round_bf16(self, x: Self::V) -> Self::V {
        let mut lanes = [T::ZERO; MAX_WIDTH];
        // SAFETY: `lanes` holds at least WIDTH elements.
        unsafe {
            self.store(lanes.as_mut_ptr(), x);
            for lane in lanes[..Self::WIDTH].iter_mut() {
                *lane = T::from_f64(half::bf16::from_f32(lane.to_f64() as f32).to_f64());
            }
            self.load(lanes.as_ptr())
        }
    }

    /// Writes the `WIDTH` lanes of `x` as bfloat16 bits with stochastic
    /// rounding, lane `i` taking the random bits of element `first + i`
    /// (what [`crate::rounding::stochastic_bf16`] and
    /// [`crate::rounding::element_bits`] give lane by lane).
    ///
    /// # Safety
    /// `out` must be valid for writing `WIDTH` u16 values.
    #[inline(always)]
    unsafe fn narrow_bf16_stochastic(
        self,
        x: Self::V,
        first: u32,
        key: crate::rounding::StreamKey,
        out: *mut u16,
    ) {
        let mut lanes = [T::ZERO; MAX_WIDTH];
        // SAFETY: `lanes` holds at least WIDTH elements; i < WIDTH for `out`.
        unsafe {
            self.store(lanes.as_mut_ptr(), x);
            for (i, lane) in lanes[..Self::WIDTH].iter().enumerate() {
                let bits = crate::rounding::element_bits(first.wrapping_add(i as u32), key);
                *out.add(i) = crate::rounding::stochastic_bf16(lane.to_f64() as f32, bits);
            }
        }
    }
}

/// The most lanes any [`Lanes`] has (AVX-512 f32).
pub const MAX_WIDTH: usize = 16;

/// A kernel's per-element work at offset `i`, written once for every [`Lanes`].
pub trait LaneBlock<T: Real> {
    /// Processes elements `i..i + S::WIDTH`.
    ///
    /// # Safety
    /// The caller guarantees `i + S::WIDTH` is within every array the block reads or writes.
    unsafe fn apply<S: Lanes<T>>(&mut self, simd: S, i: usize);
}

/// Runs `block` over `n` elements: whole vectors of `S` first, then the tail
/// through [`Scalar`], which performs the same per-lane operations.
///
/// # Safety
/// Every array `block` touches must hold at least `n` elements.
#[inline(always)]
pub unsafe fn run_blocks<T: Real, S: Lanes<T>, B: LaneBlock<T>>(simd: S, n: usize, block: &mut B)
where
    Scalar: Lanes<T>,
{
    let full = n - n % S::WIDTH;
    let mut i = 0;
    while i < full {
        // SAFETY: i + WIDTH <= full <= n.
        unsafe { block.apply(simd, i) };
        i += S::WIDTH;
    }
    while i < n {
        // SAFETY: i < n and Scalar::WIDTH == 1.
        unsafe { block.apply(Scalar, i) };
        i += 1;
    }
}
