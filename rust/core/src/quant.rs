//! Block-wise 8-bit quantisation with bitsandbytes' dynamic maps: each block
//! of [`BLOCK`] values keeps its absolute maximum (f32), and each value is the
//! code whose map entry is nearest to `value / absmax` (ties to the lower
//! code: the code is the number of midpoints between neighbouring entries
//! that lie strictly below the value, as bitsandbytes' `bucketize` and its
//! CPU lookup table define it). Dequantising is `map[code] * absmax`.
//!
//! Finding the code is one table lookup, not a search: the sign, exponent
//! and top [`KEY_MANTISSA_BITS`] mantissa bits of the normalised value pick a
//! bucket that holds at most one midpoint (checked when the table is built);
//! its entry holds the count of midpoints below the bucket and the low 16
//! bits of the midpoint inside it, if any, so one integer comparison of the
//! value's own low bits finishes the job (vector paths: one load per value,
//! a gather on AVX2, sixteen scalar loads on AVX-512, which measured faster
//! than its gather on the Zen 4 dev VM). With AVX-512 VBMI, byte permutes
//! code 64 values at a time from tables held in registers instead
//! (`quant_bytes`). Every NaN codes as +inf: a NaN's sign is not
//! reliable, and every path must give the same code.

use crate::dispatch::{dispatch_codes, Backend, WithLanes};
use crate::engine::{self, Blockwise, Exec};
use crate::error::{Error, Result};
use crate::quant_bytes::ByteTables;
use crate::simd::{Lanes, MAX_WIDTH};
use crate::tensors::{ArraySpec, Column, DType, Extent, TensorBatch};
use std::sync::OnceLock;

/// Values per block (one absmax each), as bitsandbytes' blockwise optimizers.
pub const BLOCK: usize = 256;

/// Which dynamic map: signed for first moments, unsigned for second moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    /// `create_dynamic_map(signed=True)`: 127 negative entries, 0, 127 positive, 1.
    Signed,
    /// `create_dynamic_map(signed=False)`: 0, 254 positive entries, 1.
    Unsigned,
}

/// Mantissa bits of the bucket key (7 is the fewest that leaves at most one
/// midpoint per bucket for both maps).
const KEY_MANTISSA_BITS: u32 = 7;
/// Smallest biased exponent with buckets of its own: every magnitude below
/// 2^(EMIN-127) = 2^-23 shares bucket 0, which lies below the smallest
/// midpoint (1.6e-7).
const EMIN: usize = 104;
pub(crate) const KEY_BASE: usize = EMIN << KEY_MANTISSA_BITS;
/// The bucket of a magnitude is its bits shifted right by this, less [`KEY_BASE`].
pub(crate) const KEY_SHIFT: u32 = 23 - KEY_MANTISSA_BITS;
/// Buckets per sign: exponents EMIN..=127 (values up to 2), larger ones
/// clamp to the last; negative values' buckets follow the positive ones.
pub(crate) const BUCKETS: usize = (128 - EMIN) << KEY_MANTISSA_BITS;
/// Entry bit: the bucket holds a midpoint (whose low bits are `entry >> 16`).
pub(crate) const HAS_MIDPOINT: u32 = 1 << 8;

/// A dynamic map with what quantising to it needs.
#[derive(Debug)]
pub struct Codebook {
    /// The 256 entries, ascending, bit-identical to bitsandbytes' map.
    pub values: [f32; 256],
    /// `mid[i] = (values[i] + values[i + 1]) / 2` in f32; `mid[255] = +inf`.
    mid: [f32; 256],
    /// For each bucket (positive ones, then negative ones): how many
    /// midpoints lie strictly below every value of the bucket (bits 0-7),
    /// [`HAS_MIDPOINT`], and the low [`KEY_SHIFT`] bits of that midpoint's
    /// magnitude (bits 16-31).
    entries: Vec<u32>,
    /// The same code by byte lookups (vector paths with byte permutes).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) bytes: ByteTables,
}

impl Codebook {
    /// The codebook of `map`, built once.
    pub fn get(map: Map) -> &'static Codebook {
        static SIGNED: OnceLock<Codebook> = OnceLock::new();
        static UNSIGNED: OnceLock<Codebook> = OnceLock::new();
        match map {
            Map::Signed => SIGNED.get_or_init(|| Codebook::build(&SIGNED_BITS)),
            Map::Unsigned => UNSIGNED.get_or_init(|| Codebook::build(&UNSIGNED_BITS)),
        }
    }

    fn build(bits: &[u32; 256]) -> Codebook {
        let values = bits.map(f32::from_bits);
        let mut mid = [f32::INFINITY; 256];
        for i in 0..255 {
            assert!(values[i] < values[i + 1], "a dynamic map ascends");
            mid[i] = (values[i] + values[i + 1]) / 2.0;
        }
        let count_below = |x: f32| mid[..255].iter().filter(|&&m| m < x).count();
        let mut entries = vec![0u32; 2 * BUCKETS];
        for idx in 0..BUCKETS {
            // Bucket idx holds magnitudes [lo, hi]: bucket 0 reaches down to
            // 0, the last one up to infinity (and NaN, which compares false).
            let lo = if idx == 0 {
                0.0
            } else {
                f32::from_bits(((idx + KEY_BASE) << KEY_SHIFT) as u32)
            };
            let hi = if idx == BUCKETS - 1 {
                f32::INFINITY
            } else {
                f32::from_bits((((idx + 1 + KEY_BASE) << KEY_SHIFT) - 1) as u32)
            };
            for (key, (least, most)) in [(idx, (lo, hi)), (BUCKETS + idx, (-hi, -lo))] {
                let n = count_below(least);
                let mut entry = n as u32;
                if n < 255 && mid[n] <= most {
                    // The bucket's one midpoint: values of the bucket above it
                    // are one code up. It shares the bucket's high bits (bucket 0
                    // and the last have no midpoint), so its low bits decide.
                    assert!(mid[..255].iter().filter(|&&m| m <= most).count() == n + 1);
                    let bits = mid[n].abs().to_bits();
                    assert_eq!((bits >> KEY_SHIFT) as usize, idx + KEY_BASE);
                    entry |= HAS_MIDPOINT | (bits & ((1 << KEY_SHIFT) - 1)) << 16;
                }
                entries[key] = entry;
            }
        }
        let bytes = ByteTables::build(&values, &mid[..255], |x| quantize_with(&entries, x));
        Codebook {
            values,
            mid,
            entries,
            bytes,
        }
    }

    /// The code of a normalised value (`value / absmax`, in [-1, 1]); any
    /// input gives a code, every NaN that of +inf.
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        quantize_with(&self.entries, x)
    }

    /// The 255 midpoints between neighbouring entries (f32, as bitsandbytes computes them).
    pub fn midpoints(&self) -> &[f32] {
        &self.mid[..255]
    }

    /// The bucket table, for vector lookups.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn entries_ptr(&self) -> *const u32 {
        self.entries.as_ptr()
    }

    /// The value of `code` in a block whose absmax is `absmax`; in a block
    /// whose absmax is infinite the zero code is 0, not 0 · inf = NaN (see
    /// [`Self::quantize_extreme`]).
    #[inline(always)]
    pub fn dequantize(&self, code: u8, absmax: f32) -> f32 {
        let value = self.values[code as usize];
        if value == 0.0 && absmax.is_infinite() {
            0.0
        } else {
            value * absmax
        }
    }

    /// The code of 0 (what fresh state holds).
    pub fn zero_code(&self) -> u8 {
        self.values
            .iter()
            .position(|&v| v == 0.0)
            .expect("0 is in every map") as u8
    }

    /// Quantises one block (at most [`BLOCK`] values) into `codes` and returns
    /// its absmax: NaN when a value is NaN, 0 for an all-zero block (whose
    /// values then all get the zero code). Vectors of `simd`, scalar tail:
    /// the same codes on every path.
    ///
    /// Two kinds of block cannot be normalised by multiplying by
    /// `1 / absmax` and take [`Self::quantize_extreme`] (the same scalar
    /// code on every path): a subnormal absmax below about 2^-128, whose
    /// inverse overflows to infinity, and an infinite absmax, whose inverse
    /// is 0 (0 · inf would be NaN).
    #[inline(always)]
    pub fn quantize_block<S: Lanes<f32>>(&self, simd: S, values: &[f32], codes: &mut [u8]) -> f32 {
        let absmax = absmax(simd, values);
        let inv = inverse(absmax);
        if inv.is_infinite() || absmax.is_infinite() {
            self.quantize_extreme(values, absmax, codes);
        } else {
            self.quantize_scaled(simd, values, inv, codes);
        }
        absmax
    }

    /// Codes a block whose absmax is non-zero and either too small for its
    /// inverse to be finite, or infinite.
    ///
    /// - Tiny absmax (subnormal): the block is first scaled by 2^64, which
    ///   is exact for every value (none can overflow, and a larger
    ///   magnitude never loses bits), and then coded with the inverse of the
    ///   scaled absmax. Both factors are normal, so the normalised values
    ///   are those a block scaled by 2^64 everywhere gets: a block's codes
    ///   do not depend on its scale.
    /// - Infinite absmax: an infinite element normalises to ±1 (the end
    ///   codes, stored back as ±inf), every finite element to 0 (the zero
    ///   code, which [`Self::dequantize`] turns back into 0, not 0 · inf =
    ///   NaN). This is the limit of `value / absmax`, and what fp32 Adam
    ///   does with an overflowed second moment: the infinite element's
    ///   update is `m / inf = 0`, and no element of the block turns NaN;
    ///   the finite ones lose their value, as tiny values next to a huge
    ///   one do in every block.
    #[cold]
    fn quantize_extreme(&self, values: &[f32], absmax: f32, codes: &mut [u8]) {
        const SCALE: f32 = 18_446_744_073_709_551_616.0; // 2^64
        let normalise = |x: f32| -> f32 {
            if absmax.is_infinite() {
                // No NaN here: a NaN element makes the absmax NaN.
                if x.is_infinite() {
                    x.signum()
                } else {
                    0.0
                }
            } else {
                (x * SCALE) * (1.0 / (absmax * SCALE))
            }
        };
        for (c, &x) in codes.iter_mut().zip(values) {
            *c = self.quantize(normalise(x));
        }
    }

    /// `codes[i] = self.quantize(values[i] * inv)`: runs of
    /// [`Lanes::CODE_RUN`], vectors, scalar tail.
    #[inline(always)]
    pub fn quantize_scaled<S: Lanes<f32>>(
        &self,
        simd: S,
        values: &[f32],
        inv: f32,
        codes: &mut [u8],
    ) {
        let n = values.len().min(codes.len());
        let runs = n - n % S::CODE_RUN;
        let full = n - n % S::WIDTH;
        let (src, dst) = (values.as_ptr(), codes.as_mut_ptr());
        // SAFETY: every access is below `n`.
        unsafe {
            simd.quantize_many(src, runs, inv, self, dst);
            for i in (runs..full).step_by(S::WIDTH) {
                let x = simd.mul(simd.load(src.add(i)), simd.splat(inv));
                simd.quantize(x, self, dst.add(i));
            }
            for i in full..n {
                *dst.add(i) = self.quantize(*src.add(i) * inv);
            }
        }
    }

    /// Dequantises one block (vectors of `simd`, scalar tail).
    #[inline(always)]
    pub fn dequantize_block<S: Lanes<f32>>(
        &self,
        simd: S,
        codes: &[u8],
        absmax: f32,
        out: &mut [f32],
    ) {
        let n = out.len().min(codes.len());
        if absmax.is_infinite() {
            // Rare, and the vector paths would give 0 · inf = NaN for the zero code.
            for (o, &c) in out[..n].iter_mut().zip(codes) {
                *o = self.dequantize(c, absmax);
            }
            return;
        }
        let runs = n - n % S::CODE_RUN;
        let full = n - n % S::WIDTH;
        let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
        // SAFETY: every access is below `n`.
        unsafe {
            simd.dequantize_many(src, runs, self, absmax, dst);
            for i in (runs..full).step_by(S::WIDTH) {
                simd.store(dst.add(i), simd.dequantize(src.add(i), self, absmax));
            }
            for i in full..n {
                *dst.add(i) = self.dequantize(*src.add(i), absmax);
            }
        }
    }
}

/// What a block's values are multiplied by before they are coded:
/// bitsandbytes multiplies by 1 / absmax; a zero block gets the zero code.
/// Infinite for a subnormal absmax below about 2^-128 and 0 for an infinite
/// one: [`Codebook::quantize_block`] codes those blocks another way.
#[inline(always)]
pub fn inverse(absmax: f32) -> f32 {
    if absmax == 0.0 {
        0.0
    } else {
        1.0 / absmax
    }
}

/// [`Codebook::quantize`] with the bucket table `entries`.
#[inline(always)]
fn quantize_with(entries: &[u32], x: f32) -> u8 {
    // Every NaN codes as +inf: a NaN's sign is not reliable (LLVM may give
    // any NaN for `x * inv`), and the code must be the same on every path.
    let bits = if x.is_nan() {
        f32::INFINITY.to_bits()
    } else {
        x.to_bits()
    };
    let magnitude = bits & 0x7fff_ffff;
    let negative = bits >> 31 != 0;
    let bucket = ((magnitude >> KEY_SHIFT) as usize)
        .saturating_sub(KEY_BASE)
        .min(BUCKETS - 1)
        + usize::from(negative) * BUCKETS;
    let entry = entries[bucket];
    let low = magnitude & ((1 << KEY_SHIFT) - 1);
    let split = entry >> 16;
    // Above the midpoint: a larger magnitude when positive, smaller when negative.
    let above = if negative { low < split } else { low > split };
    entry as u8 + u8::from(above && entry & HAS_MIDPOINT != 0)
}

/// The largest magnitude of `values` (NaN if any is NaN, 0 if empty); exact,
/// so the same on every path.
#[inline(always)]
pub fn absmax<S: Lanes<f32>>(simd: S, values: &[f32]) -> f32 {
    let n = values.len();
    let full = n - n % S::WIDTH;
    let mut acc = simd.splat(0.0);
    // SAFETY: every load is below `n`.
    unsafe {
        for i in (0..full).step_by(S::WIDTH) {
            acc = simd.max_magnitude(acc, simd.load(values.as_ptr().add(i)));
        }
    }
    let mut lanes = [0f32; MAX_WIDTH];
    // SAFETY: `lanes` holds MAX_WIDTH >= WIDTH elements.
    unsafe { simd.store(lanes.as_mut_ptr(), acc) };
    // Magnitudes order as their bits, NaN above infinity: an integer max, no branch.
    let m = lanes[..S::WIDTH]
        .iter()
        .chain(&values[full..])
        .fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
    if m > f32::INFINITY.to_bits() {
        f32::NAN // one NaN whatever the payload, on every path
    } else {
        f32::from_bits(m)
    }
}

/// Quantises `values` block by block into `codes` and `absmax` (one per block).
pub fn quantize_blockwise(
    map: Map,
    backend: Backend,
    values: &[f32],
    codes: &mut [u8],
    absmax: &mut [f32],
) {
    assert_eq!(values.len(), codes.len());
    assert_eq!(absmax.len(), values.len().div_ceil(BLOCK));
    let mut values = values.to_vec(); // the coder takes mutable values (it also dequantises)
    dispatch_codes(
        backend,
        &mut Blocks {
            book: Codebook::get(map),
            direction: Direction::Quantize,
            values: &mut values,
            codes,
            absmax,
        },
    );
}

/// `codes[i] = quantize(values[i] * inv)` on `backend`'s path, one
/// multiplier for all (what a block does after its absmax): for tests.
pub fn quantize_scaled(map: Map, backend: Backend, values: &[f32], inv: f32, codes: &mut [u8]) {
    struct Scaled<'a> {
        book: &'static Codebook,
        values: &'a [f32],
        inv: f32,
        codes: &'a mut [u8],
    }
    impl WithLanes<f32> for Scaled<'_> {
        #[inline(always)]
        fn run<S: Lanes<f32>>(&mut self, simd: S) {
            self.book
                .quantize_scaled(simd, self.values, self.inv, self.codes)
        }
    }
    assert_eq!(values.len(), codes.len());
    let book = Codebook::get(map);
    dispatch_codes(
        backend,
        &mut Scaled {
            book,
            values,
            inv,
            codes,
        },
    );
}

/// Dequantises `codes` with their block absmax into `out`.
pub fn dequantize_blockwise(
    map: Map,
    backend: Backend,
    codes: &[u8],
    absmax: &[f32],
    out: &mut [f32],
) {
    assert_eq!(out.len(), codes.len());
    assert_eq!(absmax.len(), codes.len().div_ceil(BLOCK));
    let (mut codes, mut absmax) = (codes.to_vec(), absmax.to_vec());
    dispatch_codes(
        backend,
        &mut Blocks {
            book: Codebook::get(map),
            direction: Direction::Dequantize,
            values: out,
            codes: &mut codes,
            absmax: &mut absmax,
        },
    );
}

/// Whole blocks of one tensor, coded one way, inside the chosen instruction set.
struct Blocks<'a> {
    book: &'static Codebook,
    direction: Direction,
    values: &'a mut [f32],
    codes: &'a mut [u8],
    absmax: &'a mut [f32],
}

impl WithLanes<f32> for Blocks<'_> {
    #[inline(always)]
    fn run<S: Lanes<f32>>(&mut self, simd: S) {
        for ((v, c), a) in self
            .values
            .chunks_mut(BLOCK)
            .zip(self.codes.chunks_mut(BLOCK))
            .zip(self.absmax.iter_mut())
        {
            match self.direction {
                Direction::Quantize => *a = self.book.quantize_block(simd, v, c),
                Direction::Dequantize => self.book.dequantize_block(simd, c, *a, v),
            }
        }
    }
}

/// The slot layout of [`quantize_batch`] and [`dequantize_batch`]:
/// `[values (f32), codes (u8), absmax (f32, one per block)]`.
pub const TENSOR_SPECS: [ArraySpec; 3] = [
    ArraySpec::LIKE_PARAM,
    ArraySpec::new(DType::U8, Extent::Param),
    ArraySpec::new(DType::F32, Extent::PerBlock(BLOCK)),
];

/// Whether a [`Coder`] writes codes and absmax, or the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Quantize,
    Dequantize,
}

struct Coder {
    book: &'static Codebook,
    direction: Direction,
}

impl Blockwise for Coder {
    const BLOCK: usize = BLOCK;

    fn apply(&self, backend: Backend, _slot: usize, columns: &mut [Column<'_>]) {
        let [Column::F32(values), Column::U8(codes), Column::F32(absmax)] = columns else {
            unreachable!("the batch was checked against TENSOR_SPECS");
        };
        let mut blocks = Blocks {
            book: self.book,
            direction: self.direction,
            values,
            codes,
            absmax,
        };
        dispatch_codes(backend, &mut blocks);
    }
}

fn run_coder(map: Map, batch: &TensorBatch, exec: Exec, direction: Direction) -> Result<()> {
    if batch.specs() != TENSOR_SPECS {
        return Err(Error::Mismatch(format!(
            "block-wise quantisation takes slots {TENSOR_SPECS:?}, got {:?}",
            batch.specs()
        )));
    }
    if let Some(slot) = (0..batch.slots()).find(|&i| batch.slot(i).dtype != DType::F32) {
        return Err(Error::Unsupported(format!(
            "tensor {slot} is {}; block-wise quantisation takes float32 values",
            batch.slot(slot).dtype.name()
        )));
    }
    let book = Codebook::get(map);
    engine::run_blockwise(&Coder { book, direction }, batch, exec);
    Ok(())
}

/// Quantises every slot's values into its codes and absmax (see [`TENSOR_SPECS`]).
pub fn quantize_batch(map: Map, batch: &TensorBatch, exec: Exec) -> Result<()> {
    run_coder(map, batch, exec, Direction::Quantize)
}

/// Writes every slot's values from its codes and absmax (see [`TENSOR_SPECS`]).
pub fn dequantize_batch(map: Map, batch: &TensorBatch, exec: Exec) -> Result<()> {
    run_coder(map, batch, exec, Direction::Dequantize)
}

// bitsandbytes' `create_dynamic_map(signed=True)` and `(signed=False)`
// (max_exponent_bits=7, total_bits=8), as f32 bit patterns.
const SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

const UNSIGNED_BITS: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Scalar;

    /// The code by the definition: midpoints strictly below `x`, counted in f64.
    fn reference_code(book: &Codebook, x: f64) -> u8 {
        book.mid[..255].iter().filter(|&&m| (m as f64) < x).count() as u8
    }

    #[test]
    fn lookup_equals_counting_midpoints_everywhere() {
        for map in [Map::Signed, Map::Unsigned] {
            let book = Codebook::get(map);
            // Every midpoint, its neighbours one ulp away, every entry, and a sweep.
            let mut probes: Vec<f32> = Vec::new();
            for &m in &book.mid[..255] {
                probes.extend([
                    m,
                    f32::from_bits(m.to_bits() - 1),
                    f32::from_bits(m.to_bits() + 1),
                ]);
            }
            probes.extend(book.values);
            probes.extend((0..200_001).map(|i| -1.0 + i as f32 * 1e-5));
            probes.extend((0..400).map(|i| 1e-9 * 1.05f32.powi(i)));
            probes.extend([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 3.0, f32::MIN_POSITIVE]);
            for &x in &probes {
                for x in [x, -x] {
                    assert_eq!(
                        book.quantize(x),
                        reference_code(book, x as f64),
                        "{map:?} {x:e}"
                    );
                }
            }
            assert_eq!(book.values[book.zero_code() as usize], 0.0);
            // Out-of-range input still gives a code: the end entries, NaN that of +inf.
            assert_eq!(book.quantize(f32::INFINITY), 255);
            assert_eq!(book.quantize(f32::NEG_INFINITY), 0);
            assert_eq!(book.quantize(f32::NAN), 255);
            assert_eq!(book.quantize(-f32::NAN), 255);
        }
    }

    #[test]
    fn blocks_round_trip_within_half_a_gap_for_every_length() {
        for map in [Map::Signed, Map::Unsigned] {
            let book = Codebook::get(map);
            for n in (0..=600).step_by(7).chain([255, 256, 257, 511, 512, 513]) {
                let x: Vec<f32> = (0..n)
                    .map(|i| {
                        let v = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0;
                        if map == Map::Unsigned {
                            v.abs()
                        } else {
                            v
                        }
                    })
                    .collect();
                let mut codes = vec![0u8; n];
                let mut amax = vec![0f32; n.div_ceil(BLOCK)];
                quantize_blockwise(map, Backend::Scalar, &x, &mut codes, &mut amax);
                let mut back = vec![0f32; n];
                dequantize_blockwise(map, Backend::Scalar, &codes, &amax, &mut back);
                for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
                    let a = amax[i / BLOCK] as f64;
                    let c = reference_code(book, v as f64 / a);
                    assert!(c.abs_diff(codes[i]) <= 1, "{map:?} n={n} i={i}");
                    // The nearest entry: no other entry is closer (up to f32 rounding).
                    let err = (b as f64 - v as f64).abs();
                    let best = book
                        .values
                        .iter()
                        .map(|&e| (e as f64 * a - v as f64).abs())
                        .fold(f64::INFINITY, f64::min);
                    assert!(
                        err <= best + 1e-6 * a,
                        "{map:?} n={n} i={i}: {err} > {best}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_and_nan_blocks() {
        let book = Codebook::get(Map::Signed);
        let mut codes = [9u8; 4];
        assert_eq!(book.quantize_block(Scalar, &[0.0; 4], &mut codes), 0.0);
        assert!(codes.iter().all(|&c| c == book.zero_code()));
        assert!(book
            .quantize_block(Scalar, &[1.0, f32::NAN, 2.0, 0.0], &mut codes)
            .is_nan());
    }
}
