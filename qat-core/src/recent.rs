//! Which object produced a tensor, without a per-thread history: each producer keeps the ids
//! of its last few outputs ([`RecentIds`]), and a process-wide [`Registry`] of the live
//! producers answers "who produced this tensor?" from any thread.
//!
//! Candle never reuses a [`TensorId`] within a process, so a match is genuine: a lookup finds
//! the producer or nothing, never a stale one. Memory is bounded by the number of live
//! producers times [`RECENT`]; the registry holds them weakly and forgets dropped ones. No
//! lock is held while user code runs: the registry's lock covers the scan, each producer's
//! lock one `note` or `contains`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use candle_core::{Tensor, TensorId};

/// Locks state that is consistent at every instant (a list of ids or of weak handles, each
/// changed by one push, pop or retain), so a lock poisoned by a panic elsewhere is still
/// sound to use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How many outputs of one producer are remembered: a consumer must read its input before its
/// producer made this many newer outputs (else its lookup fails, and `convert` says so).
pub(crate) const RECENT: usize = 64;

/// The ids of an object's most recent outputs.
#[derive(Debug, Default)]
pub(crate) struct RecentIds {
    ids: Mutex<VecDeque<TensorId>>,
}

impl RecentIds {
    /// Remembers that `t` is one of the outputs (the oldest is forgotten past [`RECENT`]).
    pub fn note(&self, t: &Tensor) {
        let mut ids = lock(&self.ids);
        if ids.len() == RECENT {
            ids.pop_front();
        }
        ids.push_back(t.id());
    }

    /// Whether `t` is one of the remembered outputs.
    pub fn contains(&self, t: &Tensor) -> bool {
        let id = t.id();
        lock(&self.ids).iter().rev().any(|&i| i == id)
    }
}

/// The live objects of one kind, held weakly, searchable from any thread.
#[derive(Debug)]
pub(crate) struct Registry<T> {
    entries: Mutex<Entries<T>>,
}

#[derive(Debug)]
struct Entries<T> {
    live: Vec<Weak<T>>,
    /// Prune dropped entries when `live` grows past this.
    prune_at: usize,
}

impl<T> Registry<T> {
    pub const fn new() -> Self {
        Registry {
            entries: Mutex::new(Entries {
                live: Vec::new(),
                prune_at: 16,
            }),
        }
    }

    /// Adds `item`; dropped items are forgotten (amortised over additions).
    pub fn register(&self, item: &Arc<T>) {
        let mut e = lock(&self.entries);
        if e.live.len() >= e.prune_at {
            e.live.retain(|w| w.strong_count() > 0);
            e.prune_at = (2 * e.live.len()).max(16);
        }
        e.live.push(Arc::downgrade(item));
    }

    /// The first live item `pred` accepts (`pred` is crate code and must not block).
    pub fn find(&self, mut pred: impl FnMut(&T) -> bool) -> Option<Arc<T>> {
        let e = lock(&self.entries);
        e.live
            .iter()
            .filter_map(Weak::upgrade)
            .find(|item| pred(item))
    }

    /// How many registered entries are still alive (for tests).
    #[cfg(test)]
    pub fn live(&self) -> usize {
        let e = lock(&self.entries);
        e.live.iter().filter(|w| w.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t() -> Tensor {
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn remembers_the_last_outputs_only() {
        let r = RecentIds::default();
        let first = t();
        r.note(&first);
        let others: Vec<Tensor> = (0..RECENT).map(|_| t()).collect();
        assert!(r.contains(&first));
        for o in &others {
            r.note(o);
        }
        assert!(!r.contains(&first));
        assert!(others.iter().all(|o| r.contains(o)));
        // A clone of a tensor is the same tensor; a copy is not.
        assert!(r.contains(&others[3].clone()));
        assert!(!r.contains(&others[3].copy().unwrap()));
    }

    #[test]
    fn registry_finds_live_items_and_forgets_dropped_ones() {
        let reg: Registry<RecentIds> = Registry::new();
        let x = t();
        let kept: Vec<Arc<RecentIds>> = (0..3).map(|_| Arc::new(RecentIds::default())).collect();
        for k in &kept {
            reg.register(k);
        }
        for _ in 0..100 {
            reg.register(&Arc::new(RecentIds::default()));
        }
        assert_eq!(reg.live(), 3);
        assert!(lock(&reg.entries).live.len() < 40);
        kept[1].note(&x);
        let found = reg.find(|r| r.contains(&x)).unwrap();
        assert!(Arc::ptr_eq(&found, &kept[1]));
        assert!(reg.find(|r| r.contains(&t())).is_none());
    }
}
