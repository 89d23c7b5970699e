//! Weights that published checkpoints store quantized, widened to f32 on
//! load with the semantics of the reference dequantizers:
//!
//! - FP8 e4m3 with block scales (DeepSeek-V3/R1, Kimi K2, Qwen3-FP8): each
//!   `block[0] × block[1]` tile of a `.weight` shares one scale from its
//!   `.weight_scale_inv`; the value is `f32(fp8) · scale` in f32, as
//!   transformers' `Fp8Dequantize` and DeepSeek's `weight_dequant` compute
//!   it. The last tile of a row or column may be partial.
//! - MXFP4 (gpt-oss): blocks of 32 FP4 (e2m1) values, two per byte with the
//!   low nibble first, share one power-of-two scale `2^(byte − 127)`, as
//!   transformers' `convert_moe_packed_tensors`.
//!
//! A node then keeps the values in its compute format (f32, or bf16 rounded
//! from them, as transformers' dequantization to bf16 does).

use crate::{CoreError, CoreResult};

/// FP8 e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no
/// infinities, `S.1111.111` is NaN.
pub fn fp8_e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((byte >> 3) & 0x0f);
    let mantissa = f32::from(byte & 0x07);
    if exponent == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// E8M0, the scales of the MX formats (and UE8M0 FP8 scales): `2^(byte −
/// 127)`; 255 is NaN.
pub fn e8m0_to_f32(byte: u8) -> f32 {
    if byte == 0xff {
        f32::NAN
    } else {
        2f32.powi(i32::from(byte) - 127)
    }
}

/// The FP4 e2m1 values, by nibble.
const FP4_E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The values of a `[rows, columns]` FP8 e4m3 matrix with one scale per
/// `block` tile; `scales` is `[ceil(rows / block[0]), ceil(columns /
/// block[1])]`, row-major.
pub fn dequantize_fp8_blocks(
    weight: &[u8],
    [rows, columns]: [usize; 2],
    scales: &[f32],
    block: [usize; 2],
) -> Vec<f32> {
    let table: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
    let scale_columns = columns.div_ceil(block[1]);
    debug_assert_eq!(weight.len(), rows * columns);
    debug_assert_eq!(scales.len(), rows.div_ceil(block[0]) * scale_columns);
    let mut values = Vec::with_capacity(rows * columns);
    for (row, bytes) in weight.chunks_exact(columns.max(1)).enumerate() {
        let row_scales = &scales[row / block[0] * scale_columns..][..scale_columns];
        for (tile, tile_bytes) in bytes.chunks(block[1]).enumerate() {
            let scale = row_scales[tile];
            values.extend(
                tile_bytes
                    .iter()
                    .map(|&byte| table[usize::from(byte)] * scale),
            );
        }
    }
    values
}

/// The scale grid a `[rows, columns]` FP8 weight needs, checked against
/// the one stored; `name` is the weight's, for the error.
pub fn check_fp8_scale_grid(
    name: &str,
    [rows, columns]: [usize; 2],
    block: [usize; 2],
    stored: &[usize],
) -> CoreResult<()> {
    let wanted = [rows.div_ceil(block[0]), columns.div_ceil(block[1])];
    let per_tensor = stored.iter().product::<usize>() == 1;
    if stored == wanted || (per_tensor && wanted == [1, 1]) {
        return Ok(());
    }
    Err(CoreError::Checkpoint(format!(
        "{name}_scale_inv has shape {stored:?}; a [{rows}, {columns}] FP8 weight in blocks of \
         {block:?} (quantization_config.weight_block_size) needs {wanted:?}"
    )))
}

/// MXFP4 rows: `blocks` holds `rows × groups × 16` bytes and `scales`
/// `rows × groups` exponents; row `r` has `groups × 32` values, value
/// `32g + 2i` from the low nibble of byte `i` of group `g`, `32g + 2i + 1`
/// from its high nibble.
pub fn dequantize_mxfp4(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
    debug_assert_eq!(blocks.len(), scales.len() * 16);
    let mut values = Vec::with_capacity(blocks.len() * 2);
    // `ldexp(value, scale − 127)` as the reference: zero stays zero, and
    // the exponent 255 overflows to infinity rather than meaning NaN.
    let scaled = |nibble: u8, scale: f32| {
        let value = FP4_E2M1[usize::from(nibble)];
        if value == 0.0 { value } else { value * scale }
    };
    for (group, &scale) in blocks.chunks_exact(16).zip(scales) {
        let scale = 2f32.powi(i32::from(scale) - 127);
        for &byte in group {
            values.push(scaled(byte & 0x0f, scale));
            values.push(scaled(byte >> 4, scale));
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_e4m3_decodes_normals_subnormals_signs_and_nan() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0); // the largest finite value
        assert_eq!(fp8_e4m3_to_f32(0xfe), -448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6)); // the smallest normal
        assert_eq!(fp8_e4m3_to_f32(0x3c), 1.5);
        assert!(fp8_e4m3_to_f32(0x7f).is_nan() && fp8_e4m3_to_f32(0xff).is_nan());
        // Every other byte is finite and the code is monotonic on positives.
        let positives: Vec<f32> = (0..0x7fu8).map(fp8_e4m3_to_f32).collect();
        assert!(positives.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn fp8_blocks_take_the_scale_of_their_tile_including_partial_tiles() {
        // 3 × 5 weight of ones, blocks of 2 × 2: scale grid 2 × 3.
        let weight = vec![0x38u8; 15];
        let scales = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0];
        let values = dequantize_fp8_blocks(&weight, [3, 5], &scales, [2, 2]);
        let expected = [
            [1.0, 1.0, 2.0, 2.0, 3.0],
            [1.0, 1.0, 2.0, 2.0, 3.0],
            [10.0, 10.0, 20.0, 20.0, 30.0],
        ];
        assert_eq!(values, expected.concat());
        assert!(check_fp8_scale_grid("w", [3, 5], [2, 2], &[2, 3]).is_ok());
        assert!(check_fp8_scale_grid("w", [3, 5], [8, 8], &[1]).is_ok());
        let error = check_fp8_scale_grid("w", [3, 5], [2, 2], &[2, 2]).unwrap_err();
        assert!(error.to_string().contains("needs [2, 3]"), "{error}");
    }

    #[test]
    fn mxfp4_takes_the_low_nibble_first_and_a_power_of_two_scale() {
        // One group: byte 0 = (high 0x9 → -0.5, low 0x2 → 1.0), rest zero.
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x92;
        blocks[15] = 0x7f; // low 0xf → -6, high 0x7 → 6
        let values = dequantize_mxfp4(&blocks, &[128]);
        assert_eq!(values.len(), 32);
        assert_eq!(&values[..2], &[2.0, -1.0]);
        assert_eq!(&values[30..], &[-12.0, 12.0]);
        let overflowing = dequantize_mxfp4(&blocks, &[255]);
        assert_eq!(overflowing[0], f32::INFINITY);
        assert_eq!(overflowing[2], 0.0);
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }
}
