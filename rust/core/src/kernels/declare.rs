//! What a kernel file declares, and the glue every element-wise kernel shares.
//!
//! A kernel file holds only what is its own:
//! - [`optimizer!`]: the hyper-parameters, the name, the state layout and the
//!   scalar state, from which the settings struct, its parsing and its row of
//!   [`crate::kernels::OPTIMIZERS`] are generated;
//! - [`PerElement`]: each tensor's step-dependent values (bias corrections and
//!   the like, from its scalar state) and the coefficients in the element type;
//! - [`LaneUpdate`]: the update of one vector of elements, written once over
//!   [`Lanes`].
//!
//! The engine call, the binding of the arrays and the SIMD dispatch are here.

use super::common_len;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::{Error, Result};
use crate::optimizer::Optimizer;
use crate::simd::{LaneBlock, Lanes};
use crate::tensors::{ScalarState, TensorBatch, MAX_ARITY};

/// Declares an optimizer: its settings struct (one field per hyper-parameter;
/// a pair such as `betas: (beta1, beta2)` becomes two `f64` fields), the
/// name callers pick it by, its parameter-shaped state in step order (an
/// entry followed by `if <condition on the fields>` exists only under those
/// settings) and its 0-d scalar state. It generates the struct, the
/// [`crate::optimizer::Optimizer`] impl (keys, parsing, state keys) and, unless an
/// `impl { ... }` block supplies its own methods, an element-wise `step` that
/// runs the type's [`PerElement`] update.
///
/// ```ignore
/// optimizer! {
///     /// Adam hyper-parameters of one parameter group.
///     pub struct AdamConfig = "adam" {
///         lr: f64,
///         betas: (beta1, beta2),
///         amsgrad: bool,
///     }
///     state: ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad],
///     scalars: ["step"],
/// }
/// ```
macro_rules! optimizer {
    // A pair of numbers, read once, stored as two fields.
    (@fields $head:tt [$($done:tt)*]
        $(#[$fdoc:meta])* $key:ident: ($a:ident, $b:ident) $(, $($rest:tt)*)?) => {
        $crate::kernels::declare::optimizer!(@fields $head
            [$($done)* {[$(#[$fdoc])*] $key ($a, $b) f64, (f64, f64)}] $($($rest)*)?);
    };
    // A number or a flag, stored under its key's name.
    (@fields $head:tt [$($done:tt)*]
        $(#[$fdoc:meta])* $key:ident: $ty:ty $(, $($rest:tt)*)?) => {
        $crate::kernels::declare::optimizer!(@fields $head
            [$($done)* {[$(#[$fdoc])*] $key ($key) $ty, $ty}] $($($rest)*)?);
    };
    // Every field collected: the struct and its Optimizer impl.
    (@fields {
        [$(#[$doc:meta])*] $config:ident $name:literal
        [$($state:literal $(if $cond:expr)?),*] [$($scalar:literal),*] [$($items:tt)*]
    } [$({[$(#[$fdoc:meta])*] $key:ident ($($field:ident),+) $fty:ty, $read:ty})*]) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $config {
            $($(#[$fdoc])* $(pub $field: $fty,)+)*
        }

        impl $crate::optimizer::Optimizer for $config {
            const NAME: &'static str = $name;
            const HYPER: &'static [(&'static str, $crate::optimizer::HyperKind)] = &[
                $((stringify!($key), <$read as $crate::optimizer::HyperField>::KIND),)*
            ];
            const STATE: &'static [&'static str] = &[$($state),*];
            const SCALARS: &'static [&'static str] = &[$($scalar),*];

            #[allow(unused_parens)]
            fn from_hyper(h: &mut $crate::optimizer::Hyper) -> $crate::error::Result<Self> {
                $(let ($($field),+) =
                    <$read as $crate::optimizer::HyperField>::read(h, stringify!($key))?;)*
                Ok($config { $($($field),+),* })
            }

            #[allow(unused_variables)]
            fn state_keys(&self) -> Vec<&'static str> {
                let $config { $($($field),+),* } = *self;
                let mut keys = Vec::new();
                $(if true $(&& ($cond))? {
                    keys.push($state);
                })*
                keys
            }

            $crate::kernels::declare::optimizer!(@step [$($items)*]);
        }
    };
    (@step []) => {
        fn check(
            &self,
            batch: &$crate::tensors::TensorBatch,
            scalars: &$crate::tensors::ScalarState,
            _exec: $crate::engine::Exec,
        ) -> $crate::error::Result<()> {
            $crate::kernels::declare::check(self, batch, scalars)
        }

        fn step(
            &self,
            batch: &$crate::tensors::TensorBatch,
            scalars: &mut $crate::tensors::ScalarState,
            exec: $crate::engine::Exec,
        ) -> $crate::error::Result<()> {
            $crate::kernels::declare::step(self, batch, scalars, exec)
        }
    };
    (@step [$($items:tt)+]) => { $($items)+ };
    (
        $(#[$doc:meta])*
        pub struct $config:ident = $name:literal { $($fields:tt)* }
        state: [$($state:literal $(if $cond:expr)?),* $(,)?],
        scalars: [$($scalar:literal),* $(,)?],
        $(impl { $($items:tt)* })?
    ) => {
        $crate::kernels::declare::optimizer!(@fields {
            [$(#[$doc])*] $config $name
            [$($state $(if $cond)?),*] [$($scalar),*] [$($($items)*)?]
        } [] $($fields)*);
    };
}
pub(crate) use optimizer;

/// One slot's arrays at the element being updated, in the declared order
/// `[param, grad, STATE...]`; the entries these settings do not use are null.
pub(crate) type Arrays<T> = [*mut T; MAX_ARITY];

/// The per-element update of a kernel, for one element type.
pub(crate) trait LaneUpdate<T: Element> {
    /// Updates `S::WIDTH` elements at each pointer of `arrays` (the gradient is only read).
    ///
    /// # Safety
    /// Every array these settings use is valid for `S::WIDTH` elements at its pointer.
    unsafe fn apply<S: Lanes<T>>(&self, s: S, arrays: Arrays<T>);
}

/// An optimizer whose step is an element-wise [`LaneUpdate`] of each tensor.
pub(crate) trait PerElement: Optimizer {
    /// A tensor's step-dependent values, computed in f64 as the twin computes them in Python.
    type Slot: Copy + Default + Send + Sync;
    /// The update's coefficients in element type `T`.
    type Update<T: Element>: LaneUpdate<T>;

    /// Advances tensor `slot`'s scalar state by one step and returns its
    /// values for the step. By default only torch's step counter (a first
    /// scalar named `step`) moves on, and the values are the default.
    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> Self::Slot {
        if Self::SCALARS.first() == Some(&"step") {
            scalars.increment(slot, 0);
        }
        Self::Slot::default()
    }

    /// Fails where the twin's Python arithmetic raises for tensor `slot`'s next
    /// step (a division by zero, a power out of range). Every slot is checked
    /// before any scalar state advances.
    fn check_slot(&self, _scalars: &ScalarState, _slot: usize) -> Result<()> {
        Ok(())
    }

    /// The update of a tensor whose step values are `slot`.
    fn update<T: Element>(&self, slot: Self::Slot) -> Self::Update<T>;
}

/// An update bound to the start of one slot's arrays.
pub(crate) struct Bound<U, T> {
    pub(crate) update: U,
    pub(crate) arrays: Arrays<T>,
}

impl<T: Element, U: LaneUpdate<T>> LaneBlock<T> for Bound<U, T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within every array; unused
        // (null) entries are offset without being touched.
        unsafe { self.update.apply(s, self.arrays.map(|a| a.wrapping_add(i))) }
    }
}

/// The element-wise step: every slot's scalar state advances, then one update pass.
pub(crate) fn step<O: PerElement>(
    optimizer: &O,
    batch: &TensorBatch,
    scalars: &mut ScalarState,
    exec: Exec,
) -> Result<()> {
    // Checked before the first counter is written, also when called without
    // the table entry's checks.
    check(optimizer, batch, scalars)?;
    let per_slot: Vec<O::Slot> = (0..batch.slots())
        .map(|slot| optimizer.advance(scalars, slot))
        .collect();
    run(optimizer, &per_slot, batch, exec);
    Ok(())
}

/// What [`step`] refuses before it writes: the layout, and every slot's
/// [`PerElement::check_slot`].
pub(crate) fn check<O: PerElement>(
    optimizer: &O,
    batch: &TensorBatch,
    scalars: &ScalarState,
) -> Result<()> {
    let arity = 2 + optimizer.state_keys().len();
    if batch.arity() != arity {
        return Err(Error::Mismatch(format!(
            "{} expects {arity} arrays per tensor, got {}",
            O::NAME,
            batch.arity()
        )));
    }
    if scalars.per_slot() != O::SCALARS.len() || scalars.slots() != batch.slots() {
        return Err(Error::Mismatch(format!(
            "{} expects {} scalar state entries for each of {} tensors, got {} for {}",
            O::NAME,
            O::SCALARS.len(),
            batch.slots(),
            scalars.per_slot(),
            scalars.slots()
        )));
    }
    for slot in 0..batch.slots() {
        optimizer.check_slot(scalars, slot)?;
    }
    Ok(())
}

/// One update pass over a batch of `[param, grad, state_keys()...]` slots
/// whose step values are `per_slot`.
pub(crate) fn run<O: PerElement>(
    optimizer: &O,
    per_slot: &[O::Slot],
    batch: &TensorBatch,
    exec: Exec,
) {
    let keys = optimizer.state_keys();
    assert!(
        2 + O::STATE.len() <= MAX_ARITY,
        "{}: too many state arrays",
        O::NAME
    );
    let mut at = [None; MAX_ARITY];
    at[0] = Some(0);
    at[1] = Some(1);
    for (j, name) in O::STATE.iter().enumerate() {
        at[2 + j] = keys.iter().position(|k| k == name).map(|k| 2 + k);
    }
    let kernel = Kernel {
        optimizer,
        per_slot,
        arity: 2 + keys.len(),
        at,
    };
    engine::run(&kernel, batch, exec);
}

struct Kernel<'a, O: PerElement> {
    optimizer: &'a O,
    per_slot: &'a [O::Slot],
    arity: usize,
    /// The batch array of each declared entry (`None`: not used by these settings).
    at: [Option<usize>; MAX_ARITY],
}

impl<O: PerElement> Elementwise for Kernel<'_, O> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let n = common_len(arrays, self.arity);
        let mut bound = Bound {
            update: self.optimizer.update::<T>(self.per_slot[slot]),
            arrays: [std::ptr::null_mut(); MAX_ARITY],
        };
        for (ptr, at) in bound.arrays.iter_mut().zip(self.at) {
            if let Some(k) = at {
                *ptr = arrays[k].as_mut_ptr();
            }
        }
        // SAFETY: every array bound holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut bound) }
    }

    fn writes(&self, k: usize) -> bool {
        k != 1 // the gradient is only read
    }
}
