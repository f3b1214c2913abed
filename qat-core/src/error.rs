//! The one error type of candle-qat.
//!
//! Every message says what was wrong, where (a module path when one is known) and what to
//! do about it.

/// Errors returned by candle-qat.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A quantization setting that cannot work (a range without zero, a bad bit width, ...).
    #[error("invalid quantization config: {what}; {fix}")]
    Config {
        /// What is wrong.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// Quantization parameters (scale, zero point, axis) that do not fit the tensor or range.
    #[error("invalid quantization parameters: {what}; {fix}")]
    QParams {
        /// What is wrong.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// An observer refused its input; its state is left as it was.
    #[error("{observer} rejected its input: {what}; {fix} (the observer's state is unchanged)")]
    ObserverInput {
        /// The observer's kind, as PyTorch names it.
        observer: &'static str,
        /// What is wrong with the input.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// A tensor of a dtype, device or shape an operation does not take.
    #[error("unsupported tensor: {what}; {fix}")]
    Tensor {
        /// What is wrong.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// Saved state that does not fit the object it is loaded into.
    #[error("cannot load state: {what}; {fix}")]
    State {
        /// What is wrong.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// A file that could not be written (a checkpoint, an ONNX export).
    #[error("cannot write {what}; {fix}")]
    Write {
        /// What could not be written, and why.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// A model whose forward feeds a quantized layer a tensor that no fake-quant produced (a
    /// missing QuantStub, an op candle-qat cannot see in between), so that its input qparams
    /// are unknown.
    #[error("quantized region: {what}; {fix}")]
    Region {
        /// What is wrong.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// Passes run in an order that cannot work (fuse after prepare, prepare twice, ...).
    #[error("wrong pass order: {what}; {fix}")]
    Pass {
        /// What is wrong.
        what: String,
        /// What to do about it.
        fix: String,
    },
    /// A fused group whose members the forward did not apply one after another.
    #[error(
        "fused group {group}: `{member}` was not applied to the output of `{previous}`; \
         the fused module already computes the whole group, so the forward must call the \
         members in their order on each other's outputs (or declare another group)"
    )]
    FusionOrder {
        /// The group, as its member paths.
        group: String,
        /// The member that got another tensor.
        member: String,
        /// The member whose output it should have got.
        previous: String,
    },
    /// An error that happened inside a named module of a model.
    #[error("in module `{path}`: {source}")]
    InModule {
        /// The module path, PyTorch style (`blocks.0.conv1`).
        path: String,
        /// The underlying error.
        #[source]
        source: Box<Error>,
    },
    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn config(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Config {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn qparams(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::QParams {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn tensor(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Tensor {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn pass(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Pass {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn write(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Write {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn region(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Region {
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn state(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::State {
            what: what.into(),
            fix: fix.into(),
        }
    }

    /// Wraps this error with the path of the module it happened in.
    ///
    /// ```
    /// use qat_core::Error;
    /// let e = qat_core::QDType::new(9, true).unwrap_err().in_module("blocks.0.conv1");
    /// assert!(e.to_string().starts_with("in module `blocks.0.conv1`"));
    /// ```
    pub fn in_module(self, path: impl Into<String>) -> Self {
        Error::InModule {
            path: path.into(),
            source: Box::new(self),
        }
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// Result alias used across candle-qat.
pub type Result<T> = std::result::Result<T, Error>;
