//! Transactional walks over a model: a read-only first phase computes and checks every
//! layer's change; only when all layers accepted does a second walk, in the same order, apply
//! them. An error in the first phase leaves the model exactly as it was.

use std::collections::VecDeque;

use super::{ModulePath, ModuleVisitor, ModuleVisitorMut, QuantModule, Quantizable};
use crate::error::{Error, Result};

/// `e` located at `path`; a path inside the layer that `e` already names (its
/// `weight_fake_quant`, ...) is appended to it.
pub(crate) fn at(path: &ModulePath, e: Error) -> Error {
    if path.segments().is_empty() {
        return e;
    }
    match e {
        Error::InModule {
            path: inner,
            source,
        } => Error::InModule {
            path: path.join(&inner),
            source,
        },
        e => e.in_module(path.dotted()),
    }
}

struct Check<F, T> {
    check: F,
    staged: VecDeque<(String, T)>,
}

impl<F, T> ModuleVisitor for Check<F, T>
where
    F: FnMut(&ModulePath, &dyn QuantModule) -> Result<T>,
{
    fn layer(&mut self, path: &ModulePath, module: &dyn QuantModule) -> Result<()> {
        let change = (self.check)(path, module).map_err(|e| at(path, e))?;
        self.staged.push_back((path.dotted(), change));
        Ok(())
    }
}

struct Apply<F, T> {
    apply: F,
    staged: VecDeque<(String, T)>,
}

fn changed_between(path: &str) -> Error {
    Error::state(
        format!("the model's layers changed between the two phases of a pass, at `{path}`"),
        "report this as a bug (a Quantizable impl whose visit and visit_mut walk different \
         layers)",
    )
}

impl<F, T> ModuleVisitorMut for Apply<F, T>
where
    F: FnMut(&mut dyn QuantModule, T) -> Result<()>,
{
    fn layer(&mut self, path: &ModulePath, module: &mut dyn QuantModule) -> Result<()> {
        let dotted = path.dotted();
        match self.staged.pop_front() {
            Some((p, change)) if p == dotted => {
                (self.apply)(module, change).map_err(|e| at(path, e))
            }
            _ => Err(changed_between(&dotted)),
        }
    }
}

/// Every layer's checked change, in visit order: the first phase of a transaction.
pub(crate) struct Plan<T>(VecDeque<(String, T)>);

impl<T> Plan<T> {
    /// Runs `check` on every layer (read-only, with its path); the first error is returned
    /// with the layer's path.
    pub fn stage<M>(
        model: &M,
        check: impl FnMut(&ModulePath, &dyn QuantModule) -> Result<T>,
    ) -> Result<Self>
    where
        M: Quantizable + ?Sized,
    {
        let mut c = Check {
            check,
            staged: VecDeque::new(),
        };
        model.visit(&mut ModulePath::root(), &mut c)?;
        Ok(Plan(c.staged))
    }

    /// The staged changes, in visit order.
    pub fn changes(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, t)| t)
    }

    /// Runs `apply` on every layer with what its check returned (the model must be the one
    /// staged, unchanged since).
    pub fn apply<M>(
        self,
        model: &mut M,
        apply: impl FnMut(&mut dyn QuantModule, T) -> Result<()>,
    ) -> Result<()>
    where
        M: Quantizable + ?Sized,
    {
        let mut a = Apply {
            apply,
            staged: self.0,
        };
        model.visit_mut(&mut ModulePath::root(), &mut a)?;
        match a.staged.front() {
            Some((p, _)) => Err(changed_between(p)),
            None => Ok(()),
        }
    }
}

/// Runs `check` on every layer (read-only, with its path) and, when all of them returned
/// `Ok`, `apply` on every layer with what its `check` returned, in the same order. The first
/// error of `check` is returned with the layer's path and nothing is applied.
pub(crate) fn transact<M, T>(
    model: &mut M,
    check: impl FnMut(&ModulePath, &dyn QuantModule) -> Result<T>,
    apply: impl FnMut(&mut dyn QuantModule, T) -> Result<()>,
) -> Result<()>
where
    M: Quantizable + ?Sized,
{
    Plan::stage(model, check)?.apply(model, apply)
}
