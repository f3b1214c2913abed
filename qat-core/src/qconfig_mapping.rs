//! Which qconfig each module gets: a global default, overrides by layer type and by module
//! path, with PyTorch's `propagate_qconfig_` precedence (path over type over parent).

use crate::qconfig::QConfig;

/// A type that can be named in a [`QConfigMapping`]: every layer of [`crate::nn`], and every
/// struct with `#[derive(Quantizable)]`.
pub trait Named {
    /// The name used for mapping by type (the struct's name).
    const TYPE_NAME: &'static str;
}

/// Qconfigs by path and type, over a global default. `None` keeps a module (and, unless
/// overridden, its subtree) float.
///
/// ```
/// use qat_core::nn::Linear;
/// use qat_core::qconfig::{Backend, QConfig};
/// use qat_core::qconfig_mapping::QConfigMapping;
/// let qc = QConfig::default_qat(Backend::X86);
/// let m = QConfigMapping::global(qc).set_type::<Linear>(None).set_path("head.fc", qc);
/// assert_eq!(m.resolve("head.fc", "Linear", Some(&qc)), Some(qc)); // path beats type
/// assert_eq!(m.resolve("body.fc", "Linear", Some(&qc)), None); // type beats parent
/// assert_eq!(m.resolve("body.conv", "Conv2d", Some(&qc)), Some(qc)); // parent's
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QConfigMapping {
    global: Option<QConfig>,
    by_type: Vec<(&'static str, Option<QConfig>)>,
    by_path: Vec<(String, Option<QConfig>)>,
}

impl QConfigMapping {
    /// An empty mapping: everything stays float unless set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A mapping whose global qconfig is `qconfig`.
    pub fn global(qconfig: impl Into<Option<QConfig>>) -> Self {
        QConfigMapping {
            global: qconfig.into(),
            ..Self::default()
        }
    }

    /// Sets the global qconfig.
    pub fn set_global(mut self, qconfig: impl Into<Option<QConfig>>) -> Self {
        self.global = qconfig.into();
        self
    }

    /// Sets the qconfig of every module of type `T`.
    pub fn set_type<T: Named>(self, qconfig: impl Into<Option<QConfig>>) -> Self {
        self.set_type_name(T::TYPE_NAME, qconfig)
    }

    /// Sets the qconfig of every module whose type is named `name`.
    pub fn set_type_name(
        mut self,
        name: &'static str,
        qconfig: impl Into<Option<QConfig>>,
    ) -> Self {
        let qconfig = qconfig.into();
        self.by_type.retain(|(n, _)| *n != name);
        self.by_type.push((name, qconfig));
        self
    }

    /// Sets the qconfig of the module at `path` (dotted, `blocks.0.conv1`) and, through
    /// inheritance, its subtree.
    pub fn set_path(
        mut self,
        path: impl Into<String>,
        qconfig: impl Into<Option<QConfig>>,
    ) -> Self {
        let path = path.into();
        let qconfig = qconfig.into();
        self.by_path.retain(|(p, _)| *p != path);
        self.by_path.push((path, qconfig));
        self
    }

    /// The global qconfig.
    pub fn global_qconfig(&self) -> Option<&QConfig> {
        self.global.as_ref()
    }

    /// The paths this mapping names (to check they exist in a model).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.by_path.iter().map(|(p, _)| p.as_str())
    }

    /// The qconfig of the module at `path` of type `type_name` whose parent has `parent`.
    pub fn resolve(
        &self,
        path: &str,
        type_name: &str,
        parent: Option<&QConfig>,
    ) -> Option<QConfig> {
        if let Some((_, q)) = self.by_path.iter().find(|(p, _)| p == path) {
            return *q;
        }
        if let Some((_, q)) = self.by_type.iter().find(|(n, _)| *n == type_name) {
            return *q;
        }
        parent.copied()
    }
}

/// Builds a [`QConfigMapping`]: `global => qconfig`, `type T => qconfig`, `path "a.b" =>
/// qconfig`, where each qconfig is a `QConfig` or `None` (keep float).
///
/// ```
/// use qat_core::nn::Linear;
/// use qat_core::qconfig::{Backend, QConfig};
/// use qat_core::qconfig_mapping;
/// let qc = QConfig::default_qat(Backend::Fbgemm);
/// let m = qconfig_mapping! {
///     global => qc,
///     type Linear => None,
///     path "classifier.fc" => qc,
/// };
/// assert_eq!(m.resolve("classifier.fc", "Linear", None), Some(qc));
/// ```
#[macro_export]
macro_rules! qconfig_mapping {
    (@acc $m:expr ;) => { $m };
    (@acc $m:expr ; global => $q:expr $(, $($rest:tt)*)?) => {
        $crate::qconfig_mapping!(@acc $m.set_global($q) ; $($($rest)*)?)
    };
    (@acc $m:expr ; type $t:ty => $q:expr $(, $($rest:tt)*)?) => {
        $crate::qconfig_mapping!(@acc $m.set_type::<$t>($q) ; $($($rest)*)?)
    };
    (@acc $m:expr ; path $p:expr => $q:expr $(, $($rest:tt)*)?) => {
        $crate::qconfig_mapping!(@acc $m.set_path($p, $q) ; $($($rest)*)?)
    };
    ($($rest:tt)*) => {
        $crate::qconfig_mapping!(@acc $crate::qconfig_mapping::QConfigMapping::new() ; $($rest)*)
    };
}
