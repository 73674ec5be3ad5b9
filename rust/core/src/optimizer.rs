//! What a torch-twin optimizer declares so that the bindings need no code of
//! their own for it: its hyper-parameters (parsed from one dictionary, with
//! clear errors for missing, extra or ill-typed keys), its per-parameter state
//! (arrays shaped like the parameter, and 0-d scalars such as the step
//! counter), and its step. The table of every optimizer is
//! [`crate::kernels::OPTIMIZERS`].

use crate::engine::Exec;
use crate::error::{Error, Result};
use crate::rounding::ParamRounding;
use crate::tensors::{ArraySpec, DType, Extent, ScalarState, TensorBatch};

/// `specs` with every parameter-shaped state array (after `[param, grad]`)
/// kept in bfloat16 whatever the parameter's dtype: bfloat16 optimizer
/// state, computed in f32 by the engine (2 bytes per element instead of 4).
pub fn with_bf16_state(specs: &[ArraySpec]) -> Vec<ArraySpec> {
    specs
        .iter()
        .enumerate()
        .map(|(k, s)| {
            if k >= 2 && *s == ArraySpec::LIKE_PARAM {
                ArraySpec::new(DType::BF16, Extent::Param)
            } else {
                *s
            }
        })
        .collect()
}

/// A hyper-parameter value as the caller hands it over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HyperValue {
    Float(f64),
    Flag(bool),
    Pair(f64, f64),
}

/// The kind of value a hyper-parameter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HyperKind {
    /// A real number (torch also allows a 0-d tensor).
    Float,
    /// A boolean.
    Flag,
    /// A pair of real numbers, such as Adam's `betas`.
    Pair,
}

impl HyperKind {
    fn describe(self) -> &'static str {
        match self {
            HyperKind::Float => "a number",
            HyperKind::Flag => "a bool",
            HyperKind::Pair => "a pair of numbers",
        }
    }
}

/// A field type of a settings struct declared with [`crate::kernels::declare::optimizer!`]:
/// the kind of hyper-parameter it holds and how it is read.
pub trait HyperField: Sized {
    const KIND: HyperKind;
    fn read(hyper: &mut Hyper, key: &str) -> Result<Self>;
}

impl HyperField for f64 {
    const KIND: HyperKind = HyperKind::Float;
    fn read(hyper: &mut Hyper, key: &str) -> Result<f64> {
        hyper.float(key)
    }
}

impl HyperField for bool {
    const KIND: HyperKind = HyperKind::Flag;
    fn read(hyper: &mut Hyper, key: &str) -> Result<bool> {
        hyper.flag(key)
    }
}

impl HyperField for (f64, f64) {
    const KIND: HyperKind = HyperKind::Pair;
    fn read(hyper: &mut Hyper, key: &str) -> Result<(f64, f64)> {
        hyper.pair(key)
    }
}

/// One parameter group's hyper-parameters for one optimizer, consumed key by
/// key by [`Optimizer::from_hyper`]; [`Hyper::finish`] rejects leftovers.
#[derive(Debug)]
pub struct Hyper {
    optimizer: &'static str,
    entries: Vec<(String, HyperValue, bool)>,
}

impl Hyper {
    pub fn new(optimizer: &'static str, entries: Vec<(String, HyperValue)>) -> Hyper {
        Hyper {
            optimizer,
            entries: entries.into_iter().map(|(k, v)| (k, v, false)).collect(),
        }
    }

    fn take(&mut self, key: &str, kind: HyperKind) -> Result<HyperValue> {
        let optimizer = self.optimizer;
        let Some(entry) = self.entries.iter_mut().find(|(k, _, _)| k == key) else {
            return Err(Error::InvalidArgument(format!(
                "{optimizer}: missing hyper-parameter {key:?}"
            )));
        };
        entry.2 = true;
        let value = entry.1;
        let ok = matches!(
            (kind, value),
            (HyperKind::Float, HyperValue::Float(_))
                | (HyperKind::Flag, HyperValue::Flag(_))
                | (HyperKind::Pair, HyperValue::Pair(..))
        );
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "{optimizer}: hyper-parameter {key:?} must be {}, got {value:?}",
                kind.describe()
            )));
        }
        Ok(value)
    }

    /// A real-valued hyper-parameter.
    pub fn float(&mut self, key: &str) -> Result<f64> {
        match self.take(key, HyperKind::Float)? {
            HyperValue::Float(x) => Ok(x),
            _ => unreachable!("checked by take"),
        }
    }

    /// A boolean hyper-parameter.
    pub fn flag(&mut self, key: &str) -> Result<bool> {
        match self.take(key, HyperKind::Flag)? {
            HyperValue::Flag(x) => Ok(x),
            _ => unreachable!("checked by take"),
        }
    }

    /// A pair of reals (`betas`, `etas`, ...).
    pub fn pair(&mut self, key: &str) -> Result<(f64, f64)> {
        match self.take(key, HyperKind::Pair)? {
            HyperValue::Pair(a, b) => Ok((a, b)),
            _ => unreachable!("checked by take"),
        }
    }

    /// Fails on any key no getter asked for (a typo, or another optimizer's setting).
    pub fn finish(self) -> Result<()> {
        let extra: Vec<&str> = self
            .entries
            .iter()
            .filter(|(_, _, used)| !used)
            .map(|(k, _, _)| k.as_str())
            .collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{}: unexpected hyper-parameter(s) {}",
                self.optimizer,
                extra
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

/// An optimizer with torch's per-parameter update, as one group's settings.
///
/// A step sees, per parameter, the arrays `[param, grad, state_keys()...]`
/// (shaped like the parameter unless [`Optimizer::array_specs`] says
/// otherwise) and the 0-d cells [`Optimizer::SCALARS`].
pub trait Optimizer: Sized + Send + Sync + 'static {
    /// The name callers use (`kind`), lower case.
    const NAME: &'static str;
    /// Whether a `torch.optim` class computes the same update (oxoptim's
    /// Python class of it is then a subclass of torch's).
    const TORCH_TWIN: bool = true;
    /// Every hyper-parameter [`Optimizer::from_hyper`] reads, with its kind:
    /// the caller passes exactly these keys of a torch parameter group.
    const HYPER: &'static [(&'static str, HyperKind)];
    /// Every parameter-shaped state entry any setting uses.
    const STATE: &'static [&'static str];
    /// The 0-d state entries of each parameter (torch's `step` and the like),
    /// read and written around the element-wise update.
    const SCALARS: &'static [&'static str];
    /// The entries of [`Optimizer::STATE`] the reference keeps flat (1-D,
    /// one element per parameter element) rather than shaped like the
    /// parameter; every other parameter-shaped entry must have the
    /// parameter's shape, as the reference's in-place ops require.
    const FLAT_STATE: &'static [&'static str] = &[];
    /// The parameter dtypes the step takes (a call with another is refused
    /// before anything is gathered).
    const PARAM_DTYPES: &'static [DType] = &[DType::F32, DType::F64, DType::BF16, DType::F16];

    /// Reads a group's settings (every key of [`Optimizer::HYPER`]).
    fn from_hyper(hyper: &mut Hyper) -> Result<Self>;

    /// The parameter-shaped state entries these settings use, in the order
    /// the step takes them after `[param, grad]`.
    fn state_keys(&self) -> Vec<&'static str>;

    /// What each array of a slot holds, `[param, grad, state_keys()...]`:
    /// by default every one is shaped like the parameter.
    fn array_specs(&self) -> Vec<ArraySpec> {
        vec![ArraySpec::LIKE_PARAM; 2 + self.state_keys().len()]
    }

    /// Fails where [`Optimizer::step`] would refuse this batch (a step count
    /// its arithmetic cannot take, an array it cannot use), writing nothing:
    /// a caller with several steps to run (one per kind of state) checks them
    /// all before the first writes. `step` runs these checks first itself.
    fn check(&self, _batch: &TensorBatch, _scalars: &ScalarState, _exec: Exec) -> Result<()> {
        Ok(())
    }

    /// One step over a checked batch whose arity and scalars match this
    /// optimizer's layout (see [`Entry::step`]): updates the scalar state as
    /// torch does and runs the element-wise kernel.
    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()>;
}

/// A configured optimizer with its concrete type erased.
pub trait Configured: Send + Sync {
    /// The state arrays, in step order.
    fn state_keys(&self) -> Vec<&'static str>;
    /// See [`Optimizer::array_specs`].
    fn array_specs(&self) -> Vec<ArraySpec>;
    /// See [`Optimizer::check`].
    fn check(&self, batch: &TensorBatch, scalars: &ScalarState, exec: Exec) -> Result<()>;
    /// See [`Entry::step`].
    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()>;
}

impl<O: Optimizer> Configured for O {
    fn state_keys(&self) -> Vec<&'static str> {
        Optimizer::state_keys(self)
    }
    fn array_specs(&self) -> Vec<ArraySpec> {
        Optimizer::array_specs(self)
    }
    fn check(&self, batch: &TensorBatch, scalars: &ScalarState, exec: Exec) -> Result<()> {
        Optimizer::check(self, batch, scalars, exec)
    }
    fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
        Optimizer::step(self, batch, scalars, exec)
    }
}

/// One row of the optimizer table: an [`Optimizer`] reduced to data and a
/// constructor, so callers can pick it by name.
#[derive(Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub torch_twin: bool,
    pub hyper: &'static [(&'static str, HyperKind)],
    pub state: &'static [&'static str],
    pub scalars: &'static [&'static str],
    /// See [`Optimizer::FLAT_STATE`].
    pub flat_state: &'static [&'static str],
    /// See [`Optimizer::PARAM_DTYPES`].
    pub param_dtypes: &'static [DType],
    configure: fn(&mut Hyper) -> Result<Box<dyn Configured>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).finish()
    }
}

fn configure<O: Optimizer>(hyper: &mut Hyper) -> Result<Box<dyn Configured>> {
    Ok(Box::new(O::from_hyper(hyper)?))
}

/// The table row of `O`.
pub const fn entry<O: Optimizer>() -> Entry {
    Entry {
        name: O::NAME,
        torch_twin: O::TORCH_TWIN,
        hyper: O::HYPER,
        state: O::STATE,
        scalars: O::SCALARS,
        flat_state: O::FLAT_STATE,
        param_dtypes: O::PARAM_DTYPES,
        configure: configure::<O>,
    }
}

impl Entry {
    /// Parses a group's settings; every key must be consumed.
    pub fn configure(&self, entries: Vec<(String, HyperValue)>) -> Result<Box<dyn Configured>> {
        let mut hyper = Hyper::new(self.name, entries);
        let configured = (self.configure)(&mut hyper)?;
        hyper.finish()?;
        Ok(configured)
    }

    /// Runs one step after [`Entry::check`], so that the optimizer itself
    /// never fails after writing.
    pub fn step(
        &self,
        configured: &dyn Configured,
        batch: &TensorBatch,
        scalars: &mut ScalarState,
        exec: Exec,
    ) -> Result<()> {
        self.check(configured, batch, scalars, exec)?;
        configured.step(batch, scalars, exec)
    }

    /// Fails, writing nothing, where [`Entry::step`] would refuse: the batch
    /// must have `[param, grad, state...]` per slot and one row of
    /// [`Optimizer::SCALARS`] per slot, and the optimizer's own
    /// [`Optimizer::check`] must pass.
    pub fn check(
        &self,
        configured: &dyn Configured,
        batch: &TensorBatch,
        scalars: &ScalarState,
        exec: Exec,
    ) -> Result<()> {
        let specs = configured.array_specs();
        let arity = specs.len();
        if batch.arity() != arity {
            return Err(Error::Mismatch(format!(
                "{} expects {arity} arrays per tensor, got {}",
                self.name,
                batch.arity()
            )));
        }
        let bf16_state = with_bf16_state(&specs);
        if batch.specs() != specs.as_slice() && batch.specs() != bf16_state.as_slice() {
            return Err(Error::Mismatch(format!(
                "{} expects arrays {specs:?} (or its state in bfloat16), got {:?}",
                self.name,
                batch.specs()
            )));
        }
        if batch.specs() != specs.as_slice() {
            let takes = |d: DType| matches!(d, DType::F32 | DType::BF16);
            if let Some(slot) = (0..batch.slots()).find(|&i| !takes(batch.slot(i).dtype)) {
                return Err(Error::InvalidArgument(format!(
                    "{}: bfloat16 state takes float32 or bfloat16 parameters; tensor {slot} is {}",
                    self.name,
                    batch.slot(slot).dtype.name()
                )));
            }
        }
        if scalars.per_slot() != self.scalars.len() || scalars.slots() != batch.slots() {
            return Err(Error::Mismatch(format!(
                "{} expects {} scalar state entries for each of {} tensors, got {} for {}",
                self.name,
                self.scalars.len(),
                batch.slots(),
                scalars.per_slot(),
                scalars.slots()
            )));
        }
        let kahan = exec.rounding == ParamRounding::Kahan;
        if kahan == batch.compensation().is_empty() {
            return Err(Error::Mismatch(format!(
                "{}: compensation arrays come with Kahan summation and only with it",
                self.name
            )));
        }
        if exec.rounding != ParamRounding::Nearest {
            if let Some(slot) = (0..batch.slots()).find(|&i| batch.slot(i).dtype != DType::BF16) {
                return Err(Error::InvalidArgument(format!(
                    "{}: {} takes bfloat16 parameters; tensor {slot} is {}",
                    self.name,
                    exec.rounding.name(),
                    batch.slot(slot).dtype.name()
                )));
            }
        }
        configured.check(batch, scalars, exec)
    }
}

/// Looks an optimizer up by name in `table`.
pub fn find(table: &[Entry], name: &str) -> Result<Entry> {
    table
        .iter()
        .find(|e| e.name == name)
        .copied()
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown optimizer {name:?}; known: {}",
                table.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, HyperValue)]) -> Vec<(String, HyperValue)> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn missing_extra_and_mistyped_keys_are_named() {
        let mut h = Hyper::new(
            "demo",
            entries(&[
                ("lr", HyperValue::Float(0.1)),
                ("typo", HyperValue::Flag(true)),
            ]),
        );
        assert_eq!(h.float("lr"), Ok(0.1));
        let missing = h.float("eps").unwrap_err().to_string();
        assert!(
            missing.contains("missing") && missing.contains("\"eps\""),
            "{missing}"
        );
        let extra = h.finish().unwrap_err().to_string();
        assert!(
            extra.contains("unexpected") && extra.contains("\"typo\""),
            "{extra}"
        );

        let mut h = Hyper::new("demo", entries(&[("betas", HyperValue::Float(0.9))]));
        let wrong = h.pair("betas").unwrap_err().to_string();
        assert!(wrong.contains("pair of numbers"), "{wrong}");
    }
}
