//! ggml_fake_quant: GGML block fake quantization (FORMAT.md): `y` bit-exact, `blocks`
//! byte-exact, the straight-through `grad_x` exact.

use candle_core::Var;
use candle_qat::ggml::{fake_quantize_ggml, quantize_blocks, BlockType};

use crate::case::{candle, err, f32s, int, tensor, to_vec, Case, R};

fn block_type(name: &str) -> R<BlockType> {
    BlockType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or(format!("unknown GGML type `{name}`"))
}

/// Bit equality (so that -0.0 differs from 0.0), with the first difference in the message.
fn check_bits(what: &str, got: &[f32], want: &[f32]) -> R<()> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    match (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        Some(i) => Err(format!("{what}[{i}] = {:e}, want {:e}", got[i], want[i])),
        None => Ok(()),
    }
}

pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let name = j["type"].as_str().ok_or("type: not a string")?;
    let ty = block_type(name)?;
    let block = int(&j["block_size"], "block_size")? as usize;
    if block != ty.block_size() {
        return Err(format!(
            "block_size {block}, but {name} has {}",
            ty.block_size()
        ));
    }
    let x = candle(&j["x"], "x")?;
    let gy = candle(&j["grad_y"], "grad_y")?;

    let v = Var::from_tensor(&x).map_err(err)?;
    let y = fake_quantize_ggml(v.as_tensor(), ty).map_err(err)?;
    let grads = (&y * &gy)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let gx = grads.get(v.as_tensor()).ok_or("no gradient for x")?;
    check_bits("y", &to_vec(&y)?, &f32s(&j["y"], "y")?)?;
    check_bits("grad_x", &to_vec(gx)?, &f32s(&j["grad_x"], "grad_x")?)?;

    let (shape, want) = tensor(&j["blocks"], "blocks")?;
    let rows: usize = x.dims()[..x.rank() - 1].iter().product();
    let per_row = x.dims()[x.rank() - 1] / block * ty.bytes_per_block();
    if shape != [rows, per_row] {
        return Err(format!("blocks: shape {shape:?}, want [{rows}, {per_row}]"));
    }
    let got = quantize_blocks(&x, ty).map_err(err)?;
    match (0..want.len()).find(|&i| got.get(i).map(|&b| b as f64) != Some(want[i])) {
        Some(i) => Err(format!(
            "blocks byte {i} (row {}, block {}) = {:?}, want {}",
            i / per_row,
            i % per_row / ty.bytes_per_block(),
            got.get(i),
            want[i]
        )),
        None if got.len() != want.len() => {
            Err(format!("blocks: {} bytes, want {}", got.len(), want.len()))
        }
        None => Ok(()),
    }
}
