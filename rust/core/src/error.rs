use std::fmt;

/// Why a batch of tensors was refused. Nothing has been written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A hyper-parameter or argument outside its domain.
    InvalidArgument(String),
    /// Arrays of one tensor slot disagree in length or dtype, or the batch is malformed.
    Mismatch(String),
    /// An address that is null or not aligned for its dtype.
    BadAddress(String),
    /// Two arrays of one call share memory.
    Overlap(String),
    /// A well-formed batch the kernels do not compute (a slot mixing dtypes,
    /// which torch handles by type promotion): run another implementation.
    Unsupported(String),
    /// Memory this call would touch is being written (or, for a write, read)
    /// by another call in flight on another thread.
    Busy(String),
    /// The twin's Python arithmetic raises ZeroDivisionError at this step
    /// (a float divided by zero); the message is Python's.
    ZeroDivision(String),
    /// The twin's Python arithmetic raises OverflowError at this step (`**` out
    /// of range); the message is Python's.
    Overflow(String),
    /// The twin's tensor arithmetic raises RuntimeError at this step (a complex
    /// intermediate it cannot cast back); the message is torch's.
    TorchRuntime(String),
    /// The twin's tensor arithmetic raises NotImplementedError at this step (an
    /// operator without a kernel for a complex half dtype); the message is torch's.
    TorchNotImplemented(String),
}

impl Error {
    /// Python's error for `x / 0.0`.
    pub fn float_division_by_zero() -> Error {
        Error::ZeroDivision("float division by zero".into())
    }

    /// Python's error for `0.0 ** negative`.
    pub fn zero_to_negative_power() -> Error {
        Error::ZeroDivision("0.0 cannot be raised to a negative power".into())
    }

    /// Python's error for a float `**` whose finite result is out of range. CPython
    /// formats it from `errno` (this is glibc's wording); the Python bindings raise
    /// the interpreter's own.
    pub fn power_out_of_range() -> Error {
        Error::Overflow("(34, 'Numerical result out of range')".into())
    }

    /// Python's `base ** exponent` on two floats: its ZeroDivisionError for
    /// `0.0 ** negative`, its OverflowError for a finite result out of range.
    pub fn checked_py_pow(base: f64, exponent: f64) -> Result<f64> {
        if base == 0.0 && exponent < 0.0 && exponent.is_finite() {
            return Err(Error::zero_to_negative_power());
        }
        let value = base.powf(exponent);
        if value.is_infinite() && base.is_finite() && exponent.is_finite() {
            return Err(Error::power_out_of_range());
        }
        Ok(value)
    }

    /// Python's `numerator / denominator` on two floats: its ZeroDivisionError for a zero denominator.
    pub fn checked_py_div(numerator: f64, denominator: f64) -> Result<f64> {
        if denominator == 0.0 {
            return Err(Error::float_division_by_zero());
        }
        Ok(numerator / denominator)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m)
            | Error::Mismatch(m)
            | Error::BadAddress(m)
            | Error::Overlap(m)
            | Error::Unsupported(m)
            | Error::Busy(m)
            | Error::ZeroDivision(m)
            | Error::Overflow(m)
            | Error::TorchRuntime(m)
            | Error::TorchNotImplemented(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
