//! Locking a layer's shared state: a poisoned lock is an error, never a panic.

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Locks a mutex; a poisoned lock (a panic elsewhere mid-update) is an error.
pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| {
        Error::state(
            "a fake-quant's lock was poisoned by a panic in another thread",
            "rebuild or reload the model",
        )
    })
}
