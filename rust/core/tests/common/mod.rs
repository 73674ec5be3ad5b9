//! Test helpers shared by the kernel test files: deterministic data, the
//! storage dtypes, and tensor slots laid out at chosen misalignments.
#![allow(dead_code)] // each test file uses its own subset

use half::{bf16, f16};
use oxoptim_core::{AdamConfig, Backend, DType, Exec, RawTensor, TensorBatch};

/// Deterministic pseudo-random values in [-2, 2), with some exact zeros so
/// that sign(0) and zero gradients are exercised.
pub fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0;
            if x.is_multiple_of(17) {
                0.0
            } else {
                v
            }
        })
        .collect()
}

/// An element type as stored in memory, compared bit for bit.
pub trait Storage: Copy + PartialEq + std::fmt::Debug {
    const DTYPE: DType;
    fn from_f64(x: f64) -> Self;
    fn bits(self) -> u64;
}

macro_rules! storage {
    ($t:ty, $d:expr, $from:expr, $bits:expr) => {
        impl Storage for $t {
            const DTYPE: DType = $d;
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
            fn bits(self) -> u64 {
                $bits(self) as u64
            }
        }
    };
}
storage!(f32, DType::F32, |x| x as f32, f32::to_bits);
storage!(f64, DType::F64, |x| x, f64::to_bits);
storage!(bf16, DType::BF16, bf16::from_f64, bf16::to_bits);
storage!(f16, DType::F16, f16::from_f64, f16::to_bits);

/// `arity` arrays per tensor, one tensor per length, each starting `offset`
/// elements into its own buffer (so SIMD loads are misaligned for offset > 0).
pub struct Arrays<T> {
    buffers: Vec<Vec<T>>,
    lens: Vec<usize>,
    offset: usize,
    arity: usize,
}

impl<T: Storage> Arrays<T> {
    /// Arrays whose positions listed in `nonneg` hold |values| (e.g. second moments).
    pub fn new(lens: &[usize], arity: usize, offset: usize, seed: u64, nonneg: &[usize]) -> Self {
        let mut buffers = Vec::new();
        for (t, &n) in lens.iter().enumerate() {
            for k in 0..arity {
                let vals = values(seed ^ ((t * 31 + k) as u64), n + offset);
                let vals = vals
                    .into_iter()
                    .map(|v| if nonneg.contains(&k) { v.abs() } else { v });
                buffers.push(vals.map(T::from_f64).collect());
            }
        }
        Arrays {
            buffers,
            lens: lens.to_vec(),
            offset,
            arity,
        }
    }

    pub fn batch(&mut self) -> TensorBatch {
        let raws = self
            .buffers
            .iter_mut()
            .enumerate()
            .map(|(i, b)| RawTensor {
                addr: b[self.offset..].as_mut_ptr() as usize,
                len: self.lens[i / self.arity],
                dtype: T::DTYPE,
            })
            .collect();
        // SAFETY: the buffers outlive the batch and are not touched meanwhile.
        unsafe { TensorBatch::new(raws, self.arity).unwrap() }
    }

    pub fn bits(&self) -> Vec<Vec<u64>> {
        self.buffers
            .iter()
            .map(|b| b.iter().map(|x| x.bits()).collect())
            .collect()
    }
}

/// Start offsets (in elements) every SIMD test runs at.
pub const OFFSETS: [usize; 3] = [0, 1, 3];

/// Runs `steps` steps of `step` on fresh arrays for each backend and thread count; all must agree bit for bit.
pub fn check_all_backends<T: Storage>(
    lens: &[usize],
    arity: usize,
    nonneg: &[usize],
    threads: &[usize],
    step: impl Fn(&TensorBatch, usize, Exec),
) {
    for offset in OFFSETS {
        let reference = {
            let mut a = Arrays::<T>::new(lens, arity, offset, 7, nonneg);
            let batch = a.batch();
            for s in 0..3 {
                step(&batch, s, Exec::new(Backend::Scalar, 1));
            }
            drop(batch);
            a.bits()
        };
        for backend in Backend::supported() {
            for &t in threads {
                let mut a = Arrays::<T>::new(lens, arity, offset, 7, nonneg);
                let batch = a.batch();
                for s in 0..3 {
                    step(&batch, s, Exec::new(backend, t));
                }
                drop(batch);
                assert_eq!(
                    a.bits(),
                    reference,
                    "{backend:?} threads={t} offset={offset} dtype={:?}",
                    T::DTYPE
                );
            }
        }
    }
}

/// Adam settings the fused-storage and parameter-rounding tests share (lr 1e-2,
/// weight decay 0.1, coupled or decoupled).
pub fn adam_config(amsgrad: bool, decoupled: bool) -> AdamConfig {
    AdamConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        amsgrad,
        maximize: false,
        decoupled_weight_decay: decoupled,
    }
}

/// A tensor of `len` elements of `dtype` at `addr`.
pub fn raw(addr: usize, len: usize, dtype: DType) -> RawTensor {
    RawTensor { addr, len, dtype }
}

/// One step of `config`'s row of the table on `arrays` (laid out as its array specs say) with
/// one scalar-state row of `cells` per tensor.
///
/// # Safety
/// Every tensor described stays valid, and untouched by anything else, during the call.
pub unsafe fn step_table_row<O: oxoptim_core::optimizer::Optimizer>(
    config: &O,
    arrays: Vec<RawTensor>,
    cells: Vec<RawTensor>,
    exec: Exec,
) -> oxoptim_core::Result<()> {
    use oxoptim_core::{DisjointMemo, ScalarState, OPTIMIZERS};
    // SAFETY: forwarded to the caller.
    unsafe {
        let batch =
            TensorBatch::with_specs(arrays, &config.array_specs(), &mut DisjointMemo::default())?;
        let mut scalars = ScalarState::new(cells, O::SCALARS.len(), &batch)?;
        oxoptim_core::optimizer::find(OPTIMIZERS, O::NAME)?.step(config, &batch, &mut scalars, exec)
    }
}

/// Codes by the definition, in f64: midpoints strictly below `x / absmax`.
pub fn reference_codes(map: oxoptim_core::quant::Map, x: &[f64]) -> (Vec<u8>, f64) {
    let book = oxoptim_core::quant::Codebook::get(map);
    let absmax = x.iter().fold(0f64, |a, &b| a.max(b.abs()));
    let codes = x
        .iter()
        .map(|&v| {
            let y = if absmax == 0.0 { 0.0 } else { v / absmax };
            book.midpoints().iter().filter(|&&m| (m as f64) < y).count() as u8
        })
        .collect();
    (codes, absmax)
}

/// `run` gives the same result on every backend and thread count (1, 2, 3) as on the scalar
/// path on one thread; `what` names the case in a failure.
pub fn same_on_every_path<R: PartialEq>(what: &str, run: impl Fn(Exec) -> R) {
    let reference = run(Exec::new(Backend::Scalar, 1));
    for backend in Backend::supported() {
        for threads in [1, 2, 3] {
            assert!(
                run(Exec::new(backend, threads)) == reference,
                "{what} {backend:?} threads={threads}"
            );
        }
    }
}
