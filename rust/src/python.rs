//! PyO3 bindings: validation, zero-copy numpy, GIL released. Being written.
use pyo3::prelude::*;

#[pymodule(name = "_native", module = "ka_rs")]
fn native(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
