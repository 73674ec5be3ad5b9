//! Block-wise 8-bit quantisation of tensors (bitsandbytes' dynamic maps, one
//! absmax per block of 256): what the 8-bit optimizers use to convert fp32
//! state to 8-bit and back. Same conventions as the other bindings: tensors
//! described and held here, the kernel registered in flight and run with the
//! GIL released, `False` when some tensor needs another path (nothing written).

use crate::tensors::{column, KeepAlive};
use crate::{bump_versions, exec, or_fallback, run_in_flight, slots};
use oxoptim_core::quant::{self, Codebook, Map, TENSOR_SPECS};
use oxoptim_core::{DisjointMemo, RawTensor, TensorBatch};
use pyo3::prelude::*;
use pyo3::types::PyList;

fn map(signed: bool) -> Map {
    if signed {
        Map::Signed
    } else {
        Map::Unsigned
    }
}

/// The 256 entries of bitsandbytes' dynamic map, ascending.
#[pyfunction]
fn quantization_map(signed: bool) -> Vec<f32> {
    Codebook::get(map(signed)).values.to_vec()
}

/// The `[values, codes, absmax]` batch of three equal-length lists, or `None`.
/// `written[k]`: the call writes list `k`'s tensors.
fn batch<'py>(
    lists: [&Bound<'py, PyList>; 3],
    written: [bool; 3],
    keep: &mut KeepAlive<'py>,
) -> PyResult<Option<TensorBatch>> {
    let n = lists[0].len();
    let mut columns: Vec<Vec<RawTensor>> = Vec::with_capacity(3);
    for ((list, role), written) in lists.iter().zip(["values", "codes", "absmax"]).zip(written) {
        match column(list, n, role, written, keep)? {
            Some(c) => columns.push(c),
            None => return Ok(None),
        }
    }
    // SAFETY: every column was described from a live, dense, contiguous CPU
    // tensor of a supported dtype, held in `keep` until the call returns.
    or_fallback(unsafe {
        TensorBatch::with_specs(slots(&columns), &TENSOR_SPECS, &mut DisjointMemo::default())
    })
}

/// Quantises each `values[i]` (float32) into `codes[i]` (uint8, same
/// numel) and `absmax[i]` (float32, one per block of 256).
#[pyfunction]
#[pyo3(signature = (values, codes, absmax, *, signed, num_threads=1))]
fn quantize_blockwise(
    py: Python<'_>,
    values: &Bound<'_, PyList>,
    codes: &Bound<'_, PyList>,
    absmax: &Bound<'_, PyList>,
    signed: bool,
    num_threads: usize,
) -> PyResult<bool> {
    let exec = exec(num_threads, None)?;
    let mut keep = KeepAlive::with_capacity(3 * values.len());
    let written = [false, true, true];
    let Some(batch) = batch([values, codes, absmax], written, &mut keep)? else {
        return Ok(false);
    };
    run_in_flight(py, batch, &written, |b| {
        quant::quantize_batch(map(signed), b, exec)
    })?;
    bump_versions(py, &[codes, absmax])?;
    Ok(true)
}

/// Writes each `out[i]` (float32) from `codes[i]` and `absmax[i]`.
#[pyfunction]
#[pyo3(signature = (codes, absmax, out, *, signed, num_threads=1))]
fn dequantize_blockwise(
    py: Python<'_>,
    codes: &Bound<'_, PyList>,
    absmax: &Bound<'_, PyList>,
    out: &Bound<'_, PyList>,
    signed: bool,
    num_threads: usize,
) -> PyResult<bool> {
    let exec = exec(num_threads, None)?;
    let mut keep = KeepAlive::with_capacity(3 * out.len());
    let written = [true, false, false];
    let Some(batch) = batch([out, codes, absmax], written, &mut keep)? else {
        return Ok(false);
    };
    run_in_flight(py, batch, &written, |b| {
        quant::dequantize_batch(map(signed), b, exec)
    })?;
    bump_versions(py, &[out])?;
    Ok(true)
}

/// Adds this file's functions to `oxoptim._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantization_map, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_blockwise, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_blockwise, m)?)?;
    Ok(())
}
