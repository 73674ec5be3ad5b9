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
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m)
            | Error::Mismatch(m)
            | Error::BadAddress(m)
            | Error::Overlap(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
