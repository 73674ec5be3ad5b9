//! Adafactor, operation for operation as torch's `_single_tensor_adafactor`
//! (its for-loop path). A parameter of two or more dimensions, viewed as
//! `(batch, m, n)`, keeps a factored second moment: `row_var` (`batch·m`
//! values) and `col_var` (`batch·n`), arrays of [`Extent::Factor`] whose
//! lengths give the shape; a vector keeps a full `variance`. One call takes
//! either kind (`factored`), the caller splits a group by dimension.
//!
//! Each step needs reductions over the whole tensor (the parameter's RMS,
//! the norm of the update for clipping) and over rows and columns, so a slot
//! is one work item ([`engine::run_per_slot`]) computed in a fixed order:
//! results do not depend on the thread count or the SIMD backend (the
//! reductions are scalar code in torch's order, the element-wise parts run on
//! [`Lanes`] and equal the scalar reference lane for lane).
//!
//! The reductions follow torch's CPU kernels (x86 builds, 256-bit
//! `Vectorized`), so results equal its for-loop bit for bit: a sum of squares
//! over contiguous memory (`vector_norm` over a whole tensor or its last
//! dimension, or a single contiguous column) is [`SquareSum`], any other
//! column norm adds the rows one by one, and
//! `row_var.mean()` is [`cascade_sum`]. torch itself splits a reduction over
//! more than 32,768 elements across its threads in places (`mean` over that
//! many rows): there its result depends on its thread count, ours does not.

use super::declare::optimizer;
use super::Lerp;
use crate::dispatch::{Backend, Element, WithLanes};
use crate::engine::{self, Exec, HalfFloat, PerSlot};
use crate::error::{Error, Result};
use crate::simd::{run_blocks, LaneBlock, Lanes, Scalar};
use crate::tensors::{ArraySpec, Column, Extent, ScalarState, TensorBatch};

/// A factor of the parameter's shape, in the parameter's dtype.
const FACTOR: ArraySpec = ArraySpec {
    dtype: None,
    extent: Extent::Factor,
};

optimizer! {
    /// One group's settings. `eps1` is already resolved (torch's `None` means the
    /// machine epsilon of the group's first parameter dtype); `factored` says
    /// which state the call's parameters keep.
    pub struct AdafactorConfig = "adafactor" {
        lr: f64,
        beta2_decay: f64,
        eps1: f64,
        eps2: f64,
        d: f64,
        weight_decay: f64,
        maximize: bool,
        factored: bool,
    }
    state: ["row_var" if factored, "col_var" if factored, "variance" if !factored],
    scalars: ["step"],
    impl {
        fn array_specs(&self) -> Vec<ArraySpec> {
            if self.factored {
                vec![ArraySpec::LIKE_PARAM, ArraySpec::LIKE_PARAM, FACTOR, FACTOR]
            } else {
                vec![ArraySpec::LIKE_PARAM; 3]
            }
        }

        fn check(&self, batch: &TensorBatch, scalars: &ScalarState, _exec: Exec) -> Result<()> {
            self.shapes(batch, scalars).map(drop)
        }

        fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
            // Everything is checked before the first counter is written.
            let shapes = self.shapes(batch, scalars)?;
            let per_slot: Vec<PerStep> = (0..batch.slots())
                .map(|slot| PerStep::new(self, scalars.increment(slot, 0), shapes[slot]))
                .collect();
            engine::run_per_slot(
                &AdafactorKernel {
                    config: self,
                    per_slot: &per_slot,
                },
                batch,
                exec,
            );
            Ok(())
        }
    }
}

impl AdafactorConfig {
    /// Each slot's matrix shape (factored state), after everything a step
    /// refuses, in the order torch's Python arithmetic meets it for the first
    /// tensor: `step ** beta2_decay` (out of range), then the division by
    /// `numel ** 0.5 * d`.
    fn shapes(&self, batch: &TensorBatch, scalars: &ScalarState) -> Result<Vec<Option<Matrix>>> {
        for slot in 0..batch.slots().min(1) {
            Error::checked_py_pow(scalars.incremented(slot, 0), self.beta2_decay)?;
        }
        if self.d == 0.0 {
            return Err(Error::float_division_by_zero());
        }
        for slot in 1..batch.slots() {
            Error::checked_py_pow(scalars.incremented(slot, 0), self.beta2_decay)?;
        }
        let mut shapes = Vec::with_capacity(batch.slots());
        for slot in 0..batch.slots() {
            let p = batch.slot(slot);
            if !p.dtype.is_float() || p.len == 0 {
                return Err(Error::Unsupported(format!(
                    "adafactor: tensor {slot} ({} elements of {}) needs torch's implementation",
                    p.len,
                    p.dtype.name()
                )));
            }
            shapes.push(if self.factored {
                let row = batch.arrays()[slot * batch.arity() + 2].len;
                let col = batch.arrays()[slot * batch.arity() + 3].len;
                Some(Matrix::from_lens(p.len, row, col).ok_or_else(|| {
                    Error::Mismatch(format!(
                        "adafactor: tensor {slot}: row_var of {row} and col_var of {col} elements \
                         are not the factors of a parameter of {} elements",
                        p.len
                    ))
                })?)
            } else {
                None
            });
        }
        Ok(shapes)
    }
}

/// A parameter viewed as `batch` matrices of `rows × cols`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// The shape whose row factor has `row` elements (`batch·rows`) and
    /// column factor `col` (`batch·cols`) for `len` elements: `batch` is
    /// `row·col / len`, so the lengths alone decide it.
    pub fn from_lens(len: usize, row: usize, col: usize) -> Option<Matrix> {
        let product = row.checked_mul(col)?;
        if len == 0 || !product.is_multiple_of(len) {
            return None;
        }
        let batch = product / len;
        if batch == 0 || !row.is_multiple_of(batch) || !col.is_multiple_of(batch) {
            return None;
        }
        let m = Matrix {
            batch,
            rows: row / batch,
            cols: col / batch,
        };
        (m.batch.checked_mul(m.rows)?.checked_mul(m.cols)? == len).then_some(m)
    }
}

/// One slot's scalars of this step, in f64 as torch's Python computes them.
#[derive(Clone, Copy, Debug)]
struct PerStep {
    /// `step ** beta2_decay`: the lerp weight (torch's `one_minus_beta2_t`).
    one_minus_beta2: f64,
    /// `min(lr, 1 / step ** 0.5)`.
    rho: f64,
    shape: Option<Matrix>,
}

impl PerStep {
    fn new(c: &AdafactorConfig, step: f64, shape: Option<Matrix>) -> PerStep {
        let inv_sqrt = 1.0 / super::py_pow_half(step);
        PerStep {
            one_minus_beta2: step.powf(c.beta2_decay),
            // Python's min(lr, x) keeps lr unless x is smaller.
            rho: if inv_sqrt < c.lr { inv_sqrt } else { c.lr },
            shape,
        }
    }
}

/// Python's `max(low, x)`: `x` when it is larger, else `low` (NaN gives `low`).
fn py_max(low: f64, x: f64) -> f64 {
    if x > low {
        x
    } else {
        low
    }
}

/// torch's `clamp_min` of one value: NaN stays NaN.
fn clamp_min<T: Element>(x: T, min: T) -> T {
    if x < min {
        min
    } else {
        x
    }
}

/// Lanes of torch's CPU `Vectorized` (256 bits) for `T`: the accumulators of
/// its sum of squares over contiguous memory.
const fn torch_lanes<T>() -> usize {
    32 / std::mem::size_of::<T>()
}

/// torch's CPU sum of squares over contiguous memory, fed in pieces: element
/// `i` of the first `len - len % LANES` goes to accumulator `i % LANES`
/// (`acc + x * x`, two roundings), the accumulators are added in order, then
/// the remaining elements one by one (see [`SquareSum::finish`]).
pub struct SquareSum<T> {
    acc: [T; 8],
    lanes: usize,
    whole: usize,
    seen: usize,
    tail: [T; 8],
    tail_len: usize,
}

impl<T: Element> SquareSum<T> {
    /// A sum over `len` elements in all.
    pub fn new(len: usize) -> SquareSum<T> {
        let lanes = torch_lanes::<T>();
        SquareSum {
            acc: [T::ZERO; 8],
            lanes,
            whole: len - len % lanes,
            seen: 0,
            tail: [T::ZERO; 8],
            tail_len: 0,
        }
    }

    /// Adds the next elements, in order.
    // Inlined into the caller compiled for the chosen instruction set.
    #[inline(always)]
    pub fn push(&mut self, mut xs: &[T]) {
        let lanes = self.lanes;
        while !xs.is_empty() {
            if self.seen.is_multiple_of(lanes) && self.seen + lanes <= self.whole {
                let take = ((self.whole - self.seen).min(xs.len()) / lanes) * lanes;
                if take > 0 {
                    for chunk in xs[..take].chunks_exact(lanes) {
                        for (a, &x) in self.acc[..lanes].iter_mut().zip(chunk) {
                            *a = *a + x * x;
                        }
                    }
                    self.seen += take;
                    xs = &xs[take..];
                    continue;
                }
            }
            let x = xs[0];
            if self.seen < self.whole {
                let a = &mut self.acc[self.seen % lanes];
                *a = *a + x * x;
            } else {
                self.tail[self.tail_len] = x;
                self.tail_len += 1;
            }
            self.seen += 1;
            xs = &xs[1..];
        }
    }

    /// The sum of squares of every element pushed.
    // Inlined into the caller compiled for the chosen instruction set.
    #[inline(always)]
    pub fn finish(&self) -> T {
        let mut sum = self.acc[0];
        for &a in &self.acc[1..self.lanes] {
            sum = sum + a;
        }
        // torch's scalar tail loop as its x86 build compiles it: the squares
        // of a group of four in a vector, added one by one, then FMAs.
        let tail = &self.tail[..self.tail_len];
        let grouped = tail.len() / 4 * 4;
        for &x in &tail[..grouped] {
            sum = sum + x * x;
        }
        for &x in &tail[grouped..] {
            sum = x.mul_add(x, sum);
        }
        sum
    }
}

/// torch's CPU `sum` of contiguous memory (`cascade_sum` in its
/// SumKernel.cpp): whole vectors of [`torch_lanes`] summed by [`row_sum`],
/// then the tail elements, then the lanes, one by one; fewer elements than
/// lanes are summed by [`row_sum`] one at a time.
pub fn cascade_sum<T: Element>(x: &[T]) -> T {
    let lanes = torch_lanes::<T>();
    let whole = x.len() / lanes;
    if whole == 0 {
        return row_sum(x.len(), 1, |i, _| x[i])[0];
    }
    let vector = row_sum(whole, lanes, |i, k| x[i * lanes + k]);
    let mut sum = T::ZERO;
    for &v in &x[whole * lanes..] {
        sum = sum + v;
    }
    for &v in &vector[..lanes] {
        sum = sum + v;
    }
    sum
}

/// torch's `row_sum` of `n` elements of `width` lanes each (`at(i, lane)`):
/// four interleaved partial sums ([`multi_row_sum`] over groups of four
/// elements), the leftover elements into the first, then the four added.
fn row_sum<T: Element>(n: usize, width: usize, at: impl Fn(usize, usize) -> T) -> [T; 8] {
    let groups = n / 4;
    let partial = multi_row_sum(groups, 4 * width, |i, c| at(4 * i + c / width, c % width));
    let mut sum = [T::ZERO; 8];
    sum[..width].copy_from_slice(&partial[..width]);
    for i in groups * 4..n {
        for (k, s) in sum[..width].iter_mut().enumerate() {
            *s = *s + at(i, k);
        }
    }
    for part in 1..4 {
        for (k, s) in sum[..width].iter_mut().enumerate() {
            *s = *s + partial[part * width + k];
        }
    }
    sum
}

/// torch's `multi_row_sum`: `columns` sums over `rows` rows (`at(row,
/// column)`) in four levels of chunks of `2^max(4, ceil(log2(rows)) / 4)` rows.
fn multi_row_sum<T: Element>(
    rows: usize,
    columns: usize,
    at: impl Fn(usize, usize) -> T,
) -> [T; 32] {
    const LEVELS: usize = 4;
    let ceil_log2 = if rows <= 1 {
        0
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[T::ZERO; 32]; LEVELS];
    let add_row = |sums: &mut [T; 32], row: usize| {
        for (c, a) in sums[..columns].iter_mut().enumerate() {
            *a = *a + at(row, c);
        }
    };
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (a, b) in upper[0][..columns]
                .iter_mut()
                .zip(&mut lower[j - 1][..columns])
            {
                *a = *a + *b;
                *b = T::ZERO;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for row in i..rows {
        add_row(&mut acc[0], row);
    }
    let (first, levels) = acc.split_at_mut(1);
    for level in levels.iter() {
        for (a, &b) in first[0][..columns].iter_mut().zip(&level[..columns]) {
            *a = *a + b;
        }
    }
    first[0]
}

/// torch's `vector_norm(x).square_().div_(count)`: the square of a rounded
/// square root, divided by the element count.
// Inlined into the caller compiled for the chosen instruction set.
#[inline(always)]
fn mean_square<T: Element>(sum_of_squares: T, count: usize) -> T {
    let norm = sum_of_squares.sqrt();
    norm * norm / T::from_f64(count as f64)
}

struct AdafactorKernel<'a> {
    config: &'a AdafactorConfig,
    per_slot: &'a [PerStep],
}

impl PerSlot for AdafactorKernel<'_> {
    fn apply(&self, backend: Backend, slot: usize, columns: &mut [Column<'_>]) {
        let per = self.per_slot[slot];
        match columns {
            [Column::F32(p), Column::F32(g), state @ ..] => {
                let state = state.iter_mut().map(|c| match c {
                    Column::F32(s) => &mut **s,
                    _ => unreachable!("state has the parameter's dtype"),
                });
                f32::dispatch(backend, &mut SlotUpdate::new(self.config, per, p, g, state));
            }
            [Column::F64(p), Column::F64(g), state @ ..] => {
                let state = state.iter_mut().map(|c| match c {
                    Column::F64(s) => &mut **s,
                    _ => unreachable!("state has the parameter's dtype"),
                });
                f64::dispatch(backend, &mut SlotUpdate::new(self.config, per, p, g, state));
            }
            [Column::BF16(p), Column::BF16(g), state @ ..] => {
                let state = state.iter_mut().map(|c| match c {
                    Column::BF16(s) => &mut **s,
                    _ => unreachable!("state has the parameter's dtype"),
                });
                widened(backend, self.config, per, p, g, state);
            }
            [Column::F16(p), Column::F16(g), state @ ..] => {
                let state = state.iter_mut().map(|c| match c {
                    Column::F16(s) => &mut **s,
                    _ => unreachable!("state has the parameter's dtype"),
                });
                widened(backend, self.config, per, p, g, state);
            }
            _ => unreachable!("step() admits float parameters only"),
        }
    }
}

/// A half-precision parameter's step: float32 math on widened copies of the
/// whole parameter and state (the reductions need all of it), rounded back to
/// storage (round-to-nearest-even), as torch's fused optimizers do.
fn widened<'c, H: HalfFloat + 'c>(
    backend: Backend,
    config: &AdafactorConfig,
    per: PerStep,
    param: &mut [H],
    grad: &[H],
    state: impl Iterator<Item = &'c mut [H]>,
) {
    let widen = |xs: &[H]| xs.iter().map(|x| x.widen()).collect::<Vec<f32>>();
    let mut state: Vec<&mut [H]> = state.collect();
    let mut wide_param = widen(param);
    let wide_grad = widen(grad);
    let mut wide_state: Vec<Vec<f32>> = state.iter().map(|s| widen(s)).collect();
    f32::dispatch(
        backend,
        &mut SlotUpdate::new(
            config,
            per,
            &mut wide_param,
            &wide_grad,
            wide_state.iter_mut().map(|s| &mut s[..]),
        ),
    );
    for (dst, src) in std::iter::once(param)
        .chain(state.iter_mut().map(|s| &mut **s))
        .zip(std::iter::once(&wide_param).chain(&wide_state))
    {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = H::narrow(s);
        }
    }
}

/// One parameter's step: its arrays and this step's scalars.
struct SlotUpdate<'c, T> {
    config: &'c AdafactorConfig,
    per: PerStep,
    param: &'c mut [T],
    grad: &'c [T],
    /// `[row_var, col_var]` or `[variance]`.
    state: Vec<&'c mut [T]>,
}

impl<'c, T: Element> SlotUpdate<'c, T> {
    fn new(
        config: &'c AdafactorConfig,
        per: PerStep,
        param: &'c mut [T],
        grad: &'c [T],
        state: impl Iterator<Item = &'c mut [T]>,
    ) -> Self {
        SlotUpdate {
            config,
            per,
            param,
            grad,
            state: state.collect(),
        }
    }
}

impl<T: Element> WithLanes<T> for SlotUpdate<'_, T> {
    #[inline(always)]
    fn run<S: Lanes<T>>(&mut self, simd: S) {
        let c = self.config;
        let n = self.param.len();
        assert_eq!(self.grad.len(), n);
        // alpha = max(eps2, param.norm(2).item() / numel ** 0.5) * rho_t, before the decay.
        let mut param_squares = SquareSum::new(n);
        param_squares.push(self.param);
        let rms = param_squares.finish().sqrt().to_f64() / super::py_pow_half(n as f64);
        let alpha = py_max(c.eps2, rms) * self.per.rho;
        let mut block = UpdateBlock {
            pass: Pass::Norm,
            lerp: Lerp::new(self.per.one_minus_beta2),
            eps1_squared: T::from_f64(c.eps1 * c.eps1),
            maximize: c.maximize,
            decay: (c.weight_decay != 0.0).then(|| T::from_f64(1.0 - c.lr * c.weight_decay)),
            step: T::ZERO,
            param: self.param.as_mut_ptr(),
            grad: self.grad.as_ptr(),
            out: std::ptr::null_mut(),
            factor: None,
            variance: std::ptr::null_mut(),
        };
        if let (Some(shape), [row_var, col_var]) = (self.per.shape, &mut self.state[..]) {
            update_factors(&block.lerp, shape, self.grad, row_var, col_var);
        }
        let update_squares = self.pass(simd, &mut block);
        // denom = max(1.0, update.norm(2).item() / (numel ** 0.5 * d)); param.add_(update, alpha=-alpha / denom)
        let update_norm = update_squares.sqrt().to_f64();
        let denom = py_max(1.0, update_norm / (super::py_pow_half(n as f64) * c.d));
        block.step = T::from_f64(-alpha / denom);
        block.pass = Pass::Apply;
        self.pass(simd, &mut block);
    }
}

impl<T: Element> SlotUpdate<'_, T> {
    /// One pass of `block` over the parameter (a closure here would be
    /// compiled without the instruction set's features).
    #[inline(always)]
    fn pass<S: Lanes<T>>(&mut self, simd: S, block: &mut UpdateBlock<T>) -> T {
        let eps1 = T::from_f64(self.config.eps1);
        let n = self.param.len();
        match (self.per.shape, &mut self.state[..]) {
            (Some(shape), [row_var, col_var]) => {
                factored(simd, block, shape, row_var, col_var, eps1)
            }
            (None, [variance]) => {
                block.variance = variance.as_mut_ptr();
                vector(simd, block, n)
            }
            _ => unreachable!("the state matches the configuration"),
        }
    }
}

/// `row_var.lerp_(row_mean, w)` and `col_var.lerp_(col_mean, w)`, with
/// `row_mean`/`col_mean` the mean squares of the gradient along each row and
/// each column of every matrix of the batch.
// Inlined into the caller compiled for the chosen instruction set.
#[inline(always)]
fn update_factors<T: Element>(
    lerp: &Lerp<T>,
    shape: Matrix,
    grad: &[T],
    row_var: &mut [T],
    col_var: &mut [T],
) {
    let Matrix { batch, rows, cols } = shape;
    let mut col_squares = vec![T::ZERO; cols];
    for b in 0..batch {
        let g = &grad[b * rows * cols..(b + 1) * rows * cols];
        col_squares.fill(T::ZERO);
        for (i, row) in g.chunks_exact(cols).enumerate() {
            let mut squares = SquareSum::new(cols);
            squares.push(row);
            let r = &mut row_var[b * rows + i];
            *r = lerp.apply(Scalar, *r, mean_square(squares.finish(), cols));
            // A column's norm adds the rows one at a time...
            if cols > 1 {
                for (acc, &x) in col_squares.iter_mut().zip(row) {
                    *acc = *acc + x * x;
                }
            }
        }
        if cols == 1 {
            // ...except a single column, which is contiguous: torch reduces it
            // as it does a row (its last-dimension kernel, several accumulators).
            let mut squares = SquareSum::new(rows);
            squares.push(g);
            col_squares[0] = squares.finish();
        }
        for (v, &acc) in col_var[b * cols..(b + 1) * cols]
            .iter_mut()
            .zip(&col_squares)
        {
            *v = lerp.apply(Scalar, *v, mean_square(acc, rows));
        }
    }
}

/// Which pass over the update: its squares (for the clipping norm, also
/// updating a vector's `variance`), or the parameter update itself.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Norm,
    Apply,
}

/// Elements per scratch piece of a vector's norm pass.
const PIECE: usize = 1024;

/// A matrix row's variance estimate: `row_var[i] * col_var[j] / row_mean`.
#[derive(Clone, Copy)]
struct RowFactor<T> {
    row: T,
    /// The matrix's `col_var`.
    col: *const T,
    /// `row_var.mean(dim=-2).clamp_(min=eps1)` of the matrix.
    row_mean: T,
}

/// One pass of the update over a matrix row or a piece of a vector; its
/// pointers start at the row or piece.
struct UpdateBlock<T> {
    pass: Pass,
    lerp: Lerp<T>,
    eps1_squared: T,
    maximize: bool,
    /// `1 - lr * weight_decay` when the decay is non-zero.
    decay: Option<T>,
    /// `-alpha / denom`, set before the apply pass.
    step: T,
    param: *mut T,
    grad: *const T,
    /// Scratch for the update (norm pass).
    out: *mut T,
    factor: Option<RowFactor<T>>,
    variance: *mut T,
}

impl<T: Element> LaneBlock<T> for UpdateBlock<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the row or piece every pointer covers.
        unsafe {
            let mut g = s.load(self.grad.add(i));
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE)); // exact negation, -0 included
            }
            let v = match self.factor {
                // var_estimate = row_var @ col_var, then .div_(row_mean)
                Some(f) => s.div(
                    s.mul(s.splat(f.row), s.load(f.col.add(i))),
                    s.splat(f.row_mean),
                ),
                // variance.lerp_(grad * grad, w), written in the norm pass
                None if self.pass == Pass::Norm => {
                    let v = self
                        .lerp
                        .apply(s, s.load(self.variance.add(i)), s.mul(g, g));
                    s.store(self.variance.add(i), v);
                    v
                }
                None => s.load(self.variance.add(i)),
            };
            // update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
            let v = s.max(v, s.splat(self.eps1_squared));
            let u = s.mul(s.div(s.splat(T::ONE), s.sqrt(v)), g);
            match self.pass {
                Pass::Norm => s.store(self.out.add(i), u),
                Pass::Apply => {
                    let mut p = s.load(self.param.add(i));
                    if let Some(decay) = self.decay {
                        p = s.mul(p, s.splat(decay));
                    }
                    s.store(self.param.add(i), s.mul_add(u, s.splat(self.step), p));
                }
            }
        }
    }
}

/// One pass over a factored parameter, matrix by matrix and row by row;
/// returns the update's sum of squares in the norm pass (0 in the apply pass).
// Inlined into the caller compiled for the chosen instruction set.
#[inline(always)]
fn factored<T: Element, S: Lanes<T>>(
    simd: S,
    block: &mut UpdateBlock<T>,
    shape: Matrix,
    row_var: &[T],
    col_var: &[T],
    eps1: T,
) -> T {
    let Matrix { batch, rows, cols } = shape;
    let mut squares = SquareSum::new(batch * rows * cols);
    let norm = block.pass == Pass::Norm;
    let mut scratch = vec![T::ZERO; if norm { cols } else { 0 }];
    let (param, grad) = (block.param, block.grad);
    for b in 0..batch {
        let r = &row_var[b * rows..(b + 1) * rows];
        // var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        let row_mean = clamp_min(cascade_sum(r) / T::from_f64(rows as f64), eps1);
        for (i, &row) in r.iter().enumerate() {
            let at = (b * rows + i) * cols;
            block.factor = Some(RowFactor {
                row,
                col: col_var[b * cols..(b + 1) * cols].as_ptr(),
                row_mean,
            });
            // SAFETY: parameter and gradient hold the row at `at`; the column
            // factor and the scratch (norm pass) hold `cols` elements.
            unsafe {
                block.param = param.add(at);
                block.grad = grad.add(at);
                block.out = scratch.as_mut_ptr();
                run_blocks(simd, cols, block);
            }
            if norm {
                squares.push(&scratch);
            }
        }
    }
    (block.param, block.grad) = (param, grad);
    squares.finish()
}

/// One pass over a vector, piece by piece; returns the update's sum of
/// squares in the norm pass (0 in the apply pass).
// Inlined into the caller compiled for the chosen instruction set.
#[inline(always)]
fn vector<T: Element, S: Lanes<T>>(simd: S, block: &mut UpdateBlock<T>, n: usize) -> T {
    let mut squares = SquareSum::new(n);
    let norm = block.pass == Pass::Norm;
    let mut scratch = vec![T::ZERO; if norm { PIECE.min(n) } else { 0 }];
    let (param, grad, variance) = (block.param, block.grad, block.variance);
    let mut start = 0;
    while start < n {
        let len = PIECE.min(n - start);
        // SAFETY: every array holds `n` elements, the scratch `len` (norm pass).
        unsafe {
            block.param = param.add(start);
            block.grad = grad.add(start);
            block.variance = variance.add(start);
            block.out = scratch.as_mut_ptr();
            run_blocks(simd, len, block);
        }
        if norm {
            squares.push(&scratch[..len]);
        }
        start += len;
    }
    (block.param, block.grad, block.variance) = (param, grad, variance);
    squares.finish()
}
