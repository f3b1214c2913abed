//! The boilerplate of layers whose only state is [`Common`](super::common::Common).

/// Implements `QuantModule` and `Quantizable` for `$t` (a struct with a `common: Common`
/// field). `$observed`: whether prepare gives it an output fake-quant from the activation
/// qconfig. `params: get, set`: inherent methods listing and replacing the layer's float
/// tensors (`QuantModule::float_params`). `int8: false`: `prepare_qat` refuses a qconfig on it.
macro_rules! simple_module {
    ($t:ident, observed: $observed:expr $(, params: $get:ident, $set:ident)? $(, int8: $int8:expr)? $(, scheme: $scheme:ident)? $(, check: $check:ident)? $(, intx: $intx:ident)?) => {
        impl $crate::model::QuantModule for $t {
            fn kind(&self) -> String {
                if self.common.absorbed.is_some() {
                    "Identity".into()
                } else {
                    stringify!($t).into()
                }
            }
            fn type_name(&self) -> &'static str {
                stringify!($t)
            }
            fn stage(&self) -> $crate::model::Stage {
                self.common.stage()
            }
            fn set_training(&mut self, training: bool) {
                self.common.training = training;
            }
            fn prepare_qat(
                &mut self,
                qconfig: Option<&$crate::qconfig::QConfig>,
            ) -> $crate::error::Result<()> {
                self.prepare_with(qconfig, $observed)
            }
            fn qconfig(&self) -> Option<&$crate::qconfig::QConfig> {
                self.common.qconfig()
            }
            fn for_each_fake_quant(
                &mut self,
                f: &mut dyn FnMut(&str, &mut $crate::fake_quant::FakeQuantize),
            ) {
                self.common.for_each_fake_quant(f)
            }
            fn fake_quants(&self) -> Vec<(String, $crate::fake_quant::FakeQuantize)> {
                self.common.fake_quants()
            }
            fn stage_convert(&self) -> $crate::error::Result<$crate::model::Staged> {
                self.stage_convert_with()
            }
            fn apply_staged(&mut self, change: $crate::model::Staged) -> $crate::error::Result<()> {
                self.common.apply(change)
            }
            fn int8_state(&self) -> Option<$crate::record::Int8State> {
                self.common.int8_state()
            }
            fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
                self.common.producer_keys()
            }
            fn set_path(&mut self, path: &$crate::model::ModulePath) {
                self.common.path = path.dotted();
            }
            fn trace_key(&self) -> Option<usize> {
                Some(&self.common as *const _ as usize)
            }
            fn stage_int8_state(
                &self,
                state: $crate::record::Int8State,
            ) -> $crate::error::Result<$crate::model::Staged> {
                self.common.stage_int8_state(stringify!($t), &state)
            }
            $(
                fn float_params(&self) -> Vec<(&'static str, candle_core::Tensor)> {
                    self.$get()
                }
                fn load_float_params(
                    &mut self,
                    params: Vec<(String, candle_core::Tensor)>,
                ) -> $crate::error::Result<()> {
                    self.$set(params)
                }
            )?
            $(
                fn has_int8_form(&self) -> bool {
                    $int8
                }
            )?
            $(
                fn scheme_support(&self) -> $crate::qconfig::SchemeSupport {
                    $crate::qconfig::SchemeSupport::$scheme
                }
            )?
            $(
                fn for_each_intx_quantizer(
                    &mut self,
                    f: &mut $crate::model::IntxVisitor<'_>,
                ) -> $crate::error::Result<()> {
                    self.$intx(f)
                }
            )?
            $(
                fn check_qconfig(
                    &self,
                    qconfig: &$crate::qconfig::QConfig,
                ) -> $crate::error::Result<()> {
                    self.$check(qconfig)
                }
            )?
        }

        impl candle_core::Module for $t {
            fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
                Ok(self.forward_t(x).map_err(|e| self.common.at_path(e))?)
            }
        }

        $crate::model::leaf_quantizable!($t);
    };
}
pub(crate) use simple_module;
