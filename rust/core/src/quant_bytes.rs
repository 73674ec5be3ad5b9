//! Byte tables that let a vector path code 64 values at a time with byte
//! permutes (AVX-512 VBMI: a 128-entry byte table is one instruction), built
//! from a [`crate::quant::Codebook`]'s map and checked against its scalar
//! `quantize` by the tests.
//!
//! Dequantising reads the four bytes of a map entry from four 256-entry
//! planes. Quantising takes two lookups and a comparison:
//! 1. the sign and binade (exponent) of the normalised value pick a level-1
//!    entry: a binade without midpoints has one code (flag [`CONSTANT`]);
//!    otherwise the number `k` (0..=7) of top mantissa bits that leaves at
//!    most one midpoint per sub-bucket, as a bit offset `23 - k`;
//! 2. the 8 bits of the value from that offset, plus the level-1 `region`
//!    byte, index a 512-entry level 2 ([`UPPER`] picks the half): the code
//!    below the sub-bucket, and the 7 bits under the window of its midpoint;
//! 3. one byte comparison with those 7 bits (complemented for negative
//!    values, so that one comparison orders both signs) adds the midpoint
//!    when the value lies above it. Equal bits are decided by the scalar
//!    reference (rare: a value within 2^-14 of a midpoint, relatively), as is
//!    every value <= -2 (-inf and NaN among them, whose codes differ).

/// Level-1 flag: level 2 entries of the binade lie in the upper half.
pub(crate) const UPPER: u8 = 0x80;
/// Level-1 flag: the binade holds no midpoint; `region` is its code. With
/// [`UPPER`]: the scalar reference decides.
pub(crate) const CONSTANT: u8 = 0x40;
/// Binades below this exponent hold no midpoint (level-1 index 0).
pub(crate) const LOW_EXPONENT: u8 = 103;
/// Level-1 index of every exponent from 128 up (|value| >= 2, inf, NaN).
pub(crate) const TOP_BINADE: u8 = 25;
/// Split byte of a sub-bucket without a midpoint: above every 7-bit value.
const NO_SPLIT: u8 = 0xff;

#[cfg(test)]
/// The level-1 index of a value's bits: `min(exponent -sat 103, 25) + 64 * sign`.
pub(crate) fn binade_index(bits: u32) -> usize {
    let exponent = ((bits >> 23) & 0xff) as u8;
    exponent.saturating_sub(LOW_EXPONENT).min(TOP_BINADE) as usize + 64 * (bits >> 31) as usize
}

#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct ByteTables {
    /// `planes[b][code]`: byte `b` of the bits of the map entry `code`.
    pub planes: [[u8; 256]; 4],
    /// Level 1: [`UPPER`] | [`CONSTANT`] | window bit offset.
    pub window: [u8; 128],
    /// Level 1: region start less the window of the binade's first value
    /// (wrapping), or the code of a [`CONSTANT`] binade.
    pub region: [u8; 128],
    /// Level 2: midpoints below each sub-bucket (its lowest value's code).
    pub below: [u8; 512],
    /// Level 2: the 7 bits under the window of the sub-bucket's midpoint,
    /// complemented for negative values; [`NO_SPLIT`] without one.
    pub split: [u8; 512],
}

impl ByteTables {
    /// The tables of a map with entries `values` and midpoints `mid` (255,
    /// ascending); `quantize` is the scalar reference, for constant binades.
    pub(crate) fn build(values: &[f32; 256], mid: &[f32], quantize: impl Fn(f32) -> u8) -> Self {
        let mut t = ByteTables {
            planes: [[0; 256]; 4],
            window: [0; 128],
            region: [0; 128],
            below: [0; 512],
            split: [0; 512],
        };
        for (code, v) in values.iter().enumerate() {
            for (b, plane) in t.planes.iter_mut().enumerate() {
                plane[code] = v.to_bits().to_le_bytes()[b];
            }
        }
        let below = |x: f32| mid.iter().filter(|&&m| m < x).count();
        // Each binade with midpoints: (level-1 index, window size k, first magnitude).
        let mut binades = Vec::new();
        for index in 0..128usize {
            let negative = index >= 64;
            let (lo, hi) = match index % 64 {
                0 => (0u32, ((LOW_EXPONENT as u32 + 1) << 23) - 1),
                b @ 1..=24 => {
                    let e = LOW_EXPONENT as u32 + b as u32;
                    (e << 23, ((e + 1) << 23) - 1)
                }
                _ => (128 << 23, 0x7fff_ffff),
            };
            let sign = if negative { 1u32 << 31 } else { 0 };
            let inside: Vec<u32> = mid
                .iter()
                .map(|m| m.to_bits())
                .filter(|&m| m & (1 << 31) == sign && (lo..=hi).contains(&(m & 0x7fff_ffff)))
                .map(|m| m & 0x7fff_ffff)
                .collect();
            if negative && index % 64 >= TOP_BINADE as usize {
                // -inf and NaN (coded as +inf) differ: the scalar reference decides.
                t.window[index] = CONSTANT | UPPER | 23;
                continue;
            }
            if inside.is_empty() {
                let code = quantize(f32::from_bits(lo | sign));
                assert_eq!(code, quantize(f32::from_bits(hi | sign)), "constant binade");
                t.window[index] = CONSTANT | 23;
                t.region[index] = code;
                continue;
            }
            let k = (0..=7u32)
                .find(|&k| {
                    let mut keys: Vec<u32> = inside.iter().map(|m| m >> (23 - k)).collect();
                    keys.dedup();
                    keys.len() == inside.len()
                })
                .expect("7 mantissa bits separate every pair of midpoints");
            binades.push((index, k, lo));
        }
        // Largest regions first, each whole in one half.
        binades.sort_by_key(|&(index, k, _)| (std::cmp::Reverse(k), index));
        let mut used = [0usize; 2];
        for (index, k, lo) in binades {
            let half = usize::from(used[0] + (1 << k) > 256);
            let start = used[half];
            used[half] += 1 << k;
            assert!(used[half] <= 256, "level 2 holds every binade");
            let offset = 23 - k;
            let negative = index >= 64;
            let window_of_lo = (lo >> offset) as u8;
            t.window[index] = if half == 1 { UPPER } else { 0 } | offset as u8;
            t.region[index] = (start as u8).wrapping_sub(window_of_lo);
            for j in 0..1u32 << k {
                let first = lo + (j << offset);
                let last = first + (1 << offset) - 1;
                let (least, most) = if negative {
                    (-f32::from_bits(last), -f32::from_bits(first))
                } else {
                    (f32::from_bits(first), f32::from_bits(last))
                };
                let code = below(least);
                let slot = half * 256 + start + j as usize;
                t.below[slot] = code as u8;
                t.split[slot] = if code < mid.len() && mid[code] <= most {
                    assert_eq!(below(most) + usize::from(mid.contains(&most)), code + 1);
                    let bits = (mid[code].to_bits() & 0x7fff_ffff) >> (offset - 7);
                    (bits as u8 & 0x7f) ^ if negative { 0x7f } else { 0 }
                } else {
                    NO_SPLIT
                };
            }
        }
        t
    }

    #[cfg(test)]
    /// The code of `x` by these tables, step by step as the vector path
    /// computes it; `None` where the scalar reference decides (equal bits).
    pub(crate) fn quantize(&self, x: f32) -> Option<u8> {
        let bits = if x.is_nan() {
            f32::INFINITY.to_bits()
        } else {
            x.to_bits()
        };
        let index = binade_index(bits);
        let window = self.window[index];
        if window & CONSTANT != 0 {
            return (window & UPPER == 0).then_some(self.region[index]);
        }
        let offset = u32::from(window & 0x3f);
        let slot = (((bits >> offset) as u8).wrapping_add(self.region[index])) as usize
            + if window & UPPER != 0 { 256 } else { 0 };
        let negative = bits >> 31 != 0;
        let low = ((bits >> (offset - 7)) as u8 & 0x7f) ^ if negative { 0x7f } else { 0 };
        let split = self.split[slot];
        (low != split).then(|| self.below[slot] + u8::from(low > split))
    }
}

#[cfg(test)]
mod tests {
    use crate::quant::{Codebook, Map};

    #[test]
    fn byte_lookups_give_the_reference_code_or_defer() {
        for map in [Map::Signed, Map::Unsigned] {
            let book = Codebook::get(map);
            let (mut deferred, mut total) = (0u64, 0u64);
            // Every 2^32 / 2^26 pattern with varied low bits, and every midpoint's neighbourhood.
            let strided = (0..1u64 << 26).map(|i| (i << 6 | (i * 0x9e37_79b9) & 63) as u32);
            let near = book.midpoints().iter().flat_map(|m| {
                let b = m.to_bits();
                (0..=300u32).flat_map(move |d| [b.wrapping_add(d), b.wrapping_sub(d)])
            });
            for bits in strided.chain(near) {
                let x = f32::from_bits(bits);
                let normalised = x.abs() <= 1.0;
                total += u64::from(normalised);
                match book.bytes.quantize(x) {
                    Some(code) => assert_eq!(code, book.quantize(x), "{map:?} {bits:#x}"),
                    None => deferred += u64::from(normalised),
                }
            }
            // Normalised values (|x| <= 1) are rarely left to the scalar reference.
            assert!(
                deferred * 50 < total,
                "{map:?}: {deferred} of {total} deferred"
            );
        }
    }
}
