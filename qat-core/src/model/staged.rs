//! [`Staged`]: one layer's change, computed and checked by the read-only first phase of a
//! transactional pass, applied by the second.

use std::any::Any;

use crate::error::{Error, Result};

/// A change to one layer that the layer computed and checked without changing anything
/// (e.g. by [`super::QuantModule::stage_convert`]); only the same layer can apply it
/// ([`super::QuantModule::apply_staged`]). The passes stage every layer of a model first and
/// apply only when all of them accepted, so an error leaves the model as it was.
///
/// ```
/// use qat_core::model::Staged;
/// assert_eq!(Staged::new(3u8).into_change::<u8>()?, Some(3));
/// assert!(Staged::new(3u8).into_change::<i64>().is_err()); // staged by another type
/// assert!(Staged::unchanged().is_unchanged());
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Debug)]
pub struct Staged(Option<Box<dyn Any + Send>>);

impl Staged {
    /// No change: the layer stays as it is.
    pub fn unchanged() -> Self {
        Staged(None)
    }

    /// A change of the layer's own type `T`.
    pub fn new<T: Any + Send>(change: T) -> Self {
        Staged(Some(Box::new(change)))
    }

    /// Whether applying it changes nothing.
    pub fn is_unchanged(&self) -> bool {
        self.0.is_none()
    }

    /// Whether the change holds a `T` (a layer that stages more than one kind of change
    /// asks before [`Staged::into_change`]).
    pub fn holds<T: Any>(&self) -> bool {
        self.0.as_ref().is_some_and(|b| b.is::<T>())
    }

    /// The change as the layer staged it (`None`: no change); an error when it was staged by
    /// a layer of another type.
    pub fn into_change<T: Any>(self) -> Result<Option<T>> {
        match self.0 {
            None => Ok(None),
            Some(b) => b.downcast::<T>().map(|t| Some(*t)).map_err(|_| {
                Error::state(
                    "a staged change was applied to a layer of another type",
                    "apply a staged change to the layer that staged it",
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_comes_back_only_as_its_own_type() {
        assert!(Staged::unchanged().is_unchanged());
        assert_eq!(Staged::unchanged().into_change::<u8>().unwrap(), None);
        assert_eq!(Staged::new(7u8).into_change::<u8>().unwrap(), Some(7));
        assert!(!Staged::new(7u8).is_unchanged());
        assert!(matches!(
            Staged::new(7u8).into_change::<u16>(),
            Err(Error::State { .. })
        ));
    }
}
