//! The contract of [`QuantModule::load_float_params`](super::QuantModule::load_float_params):
//! the tensors given must be the ones the layer lists, by name and shape.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Checks that `got` names exactly the tensors of `have`, each with the same shape.
pub(crate) fn check_float_params(have: &[(&str, Tensor)], got: &[(String, Tensor)]) -> Result<()> {
    let fix = "load parameters saved from a layer of the same kind, shape and stage";
    if have.len() != got.len() {
        let names = |v: Vec<&str>| v.join(", ");
        return Err(Error::state(
            format!(
                "the layer holds the float tensors [{}], the saved ones are [{}]",
                names(have.iter().map(|(n, _)| *n).collect()),
                names(got.iter().map(|(n, _)| n.as_str()).collect())
            ),
            fix,
        ));
    }
    for (name, t) in got {
        let Some((_, mine)) = have.iter().find(|(n, _)| n == name) else {
            return Err(Error::state(
                format!("the layer has no float tensor `{name}`"),
                fix,
            ));
        };
        if mine.dims() != t.dims() {
            return Err(Error::state(
                format!(
                    "`{name}` has shape {:?} in the layer, {:?} saved",
                    mine.dims(),
                    t.dims()
                ),
                fix,
            ));
        }
    }
    Ok(())
}
