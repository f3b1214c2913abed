//! How many nodes of one ONNX op an export wrote, from its `ExportReport`.

use candle_qat::onnx::ExportReport;

/// The number of `op` nodes in the exported graph (0 when there is none).
pub fn op_count(report: &ExportReport, op: &str) -> usize {
    report
        .op_counts
        .iter()
        .find(|(o, _)| o == op)
        .map_or(0, |(_, n)| *n)
}
