//! Optimizer updates, each written once over [`crate::simd::Lanes`].

pub mod adam;
pub mod averaging;
pub mod sgd;
pub mod subgradient;

/// Checks that `arrays` has exactly `expected` arrays of one common length and returns it.
fn common_len<T>(arrays: &[&mut [T]], expected: usize) -> usize {
    assert_eq!(
        arrays.len(),
        expected,
        "kernel received the wrong number of arrays"
    );
    let n = arrays[0].len();
    assert!(
        arrays.iter().all(|a| a.len() == n),
        "kernel arrays differ in length"
    );
    n
}
