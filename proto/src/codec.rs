//! The wire codec: `moemesh.v1.Tensor` to f32 rows and back.
//!
//! Activations travel as raw little-endian bytes in f32, bf16 or f16 with a
//! shape; inside moemesh they are computed in f32.

use bytes::Bytes;
use half::{bf16, f16};

use crate::v1::{Dtype, Tensor};

/// Why a wire tensor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The tensor is missing, or has the wrong shape, dtype, byte length or
    /// values (NaN or infinity) for what the receiver expects.
    #[error("invalid tensor: {0}")]
    InvalidTensor(String),
    /// Rows computed from finite inputs hold an infinity or NaN: the inputs
    /// (or weights) were so large that a product or sum overflowed f32.
    #[error("inputs out of range: {0}")]
    OutOfRange(String),
}

/// Result alias of the wire codec.
pub type CodecResult<T> = Result<T, CodecError>;

/// Element types an activation may have on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    F32,
    Bf16,
    F16,
}

impl WireDtype {
    /// Returns the size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    /// Reads the dtype field of a wire tensor.
    pub fn from_proto(raw: i32) -> CodecResult<Self> {
        match Dtype::try_from(raw) {
            Ok(Dtype::F32) => Ok(Self::F32),
            Ok(Dtype::Bf16) => Ok(Self::Bf16),
            Ok(Dtype::F16) => Ok(Self::F16),
            Ok(Dtype::Unspecified) => Err(CodecError::InvalidTensor("dtype is unspecified".into())),
            Err(_) => Err(CodecError::InvalidTensor(format!("unknown dtype {raw}"))),
        }
    }

    /// Returns the wire enum value.
    pub fn to_proto(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::Bf16,
            Self::F16 => Dtype::F16,
        }
    }
}

/// A batch of activation rows decoded to f32, row-major `[rows, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub rows: usize,
    pub width: usize,
    pub values: Vec<f32>,
    /// The dtype the rows arrived in, so that replies can use it too.
    pub wire_dtype: WireDtype,
}

/// What a `[rows, width]` activation tensor holds, known from its fields
/// alone: enough to check a request's sizes before decoding anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsHeader {
    pub rows: usize,
    pub wire_dtype: WireDtype,
}

/// Checks a `[rows, width]` activation tensor's shape, dtype and byte
/// length without decoding or copying its values.
pub fn check_rows_header(tensor: Option<&Tensor>, width: usize) -> CodecResult<RowsHeader> {
    let tensor = tensor.ok_or_else(|| CodecError::InvalidTensor("tensor is missing".into()))?;
    let wire_dtype = WireDtype::from_proto(tensor.dtype)?;
    let [rows, actual_width] = tensor.shape[..] else {
        return Err(CodecError::InvalidTensor(format!(
            "expected a 2-d tensor [tokens, {width}], got shape {:?}",
            tensor.shape
        )));
    };
    if actual_width != width as u64 {
        return Err(CodecError::InvalidTensor(format!(
            "hidden size is {actual_width}, this model's is {width} (shape {:?})",
            tensor.shape
        )));
    }
    let expected_bytes = rows
        .checked_mul(actual_width)
        .and_then(|elements| elements.checked_mul(wire_dtype.size() as u64))
        .ok_or_else(|| CodecError::InvalidTensor(format!("shape {:?} overflows", tensor.shape)))?;
    if tensor.data.len() as u64 != expected_bytes {
        return Err(CodecError::InvalidTensor(format!(
            "shape {:?} in {wire_dtype:?} needs {expected_bytes} bytes, got {}",
            tensor.shape,
            tensor.data.len()
        )));
    }
    let rows = usize::try_from(rows)
        .map_err(|_| CodecError::InvalidTensor(format!("shape {:?} overflows", tensor.shape)))?;
    Ok(RowsHeader { rows, wire_dtype })
}

/// Decodes a `[rows, width]` activation tensor, checking its shape, dtype,
/// byte length and that every value is finite.
pub fn decode_rows(tensor: Option<&Tensor>, width: usize) -> CodecResult<Rows> {
    let RowsHeader { rows, wire_dtype } = check_rows_header(tensor, width)?;
    let data = tensor.map(|tensor| &tensor.data[..]).unwrap_or_default();
    let values = decode_values(data, wire_dtype);
    check_finite(&values, width)?;
    Ok(Rows {
        rows,
        width,
        values,
        wire_dtype,
    })
}

/// Refuses `[_, width]` activations that hold a NaN or an infinity,
/// naming the first.
pub fn check_finite(values: &[f32], width: usize) -> CodecResult<()> {
    let Some(position) = first_non_finite(values) else {
        return Ok(());
    };
    Err(CodecError::InvalidTensor(format!(
        "value at token {}, column {} is {} (NaN and infinity are not accepted)",
        position / width.max(1),
        position % width.max(1),
        values[position]
    )))
}

/// Checks that rows computed from finite inputs (`[_, width]`) are finite,
/// naming the first value that overflowed f32.
pub fn check_no_overflow(values: &[f32], width: usize) -> CodecResult<()> {
    let Some(position) = first_non_finite(values) else {
        return Ok(());
    };
    Err(CodecError::OutOfRange(format!(
        "the output of token {}, column {} overflows f32 ({})",
        position / width.max(1),
        position % width.max(1),
        values[position]
    )))
}

/// The index of the first NaN or infinity in `values`. Activations are
/// checked on every hop, so the scan tests whole blocks without an early
/// exit (which vectorizes) and looks inside a block only when it holds one.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 256;
    const INFINITY_BITS: u32 = 0x7f80_0000;
    values.chunks(BLOCK).enumerate().find_map(|(block, chunk)| {
        let largest_magnitude_bits = chunk.iter().fold(0, |largest: u32, value| {
            largest.max(value.to_bits() & 0x7fff_ffff)
        });
        if largest_magnitude_bits < INFINITY_BITS {
            return None;
        }
        let position = chunk.iter().position(|value| !value.is_finite())?;
        Some(block * BLOCK + position)
    })
}

/// Decodes little-endian elements of `dtype` to f32; a trailing partial
/// element is ignored (callers check lengths first). Checkpoints store
/// their weights in the same three dtypes and decode through this too.
pub fn decode_values(data: &[u8], dtype: WireDtype) -> Vec<f32> {
    match dtype {
        WireDtype::F32 => data
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("chunk of 4")))
            .collect(),
        WireDtype::Bf16 => data
            .chunks_exact(2)
            .map(|bytes| bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32())
            .collect(),
        WireDtype::F16 => data
            .chunks_exact(2)
            .map(|bytes| f16::from_le_bytes([bytes[0], bytes[1]]).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as a wire tensor of the given shape and dtype
/// (rounding to nearest even for bf16 and f16).
pub fn encode(values: &[f32], shape: &[usize], dtype: WireDtype) -> Tensor {
    debug_assert_eq!(values.len(), shape.iter().product::<usize>());
    let mut data = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        WireDtype::F32 => extend_f32_le(&mut data, values),
        WireDtype::Bf16 => values
            .iter()
            .for_each(|value| data.extend_from_slice(&bf16::from_f32(*value).to_le_bytes())),
        WireDtype::F16 => values
            .iter()
            .for_each(|value| data.extend_from_slice(&f16::from_f32(*value).to_le_bytes())),
    }
    Tensor {
        dtype: dtype.to_proto() as i32,
        shape: shape.iter().map(|&dim| dim as u64).collect(),
        data: Bytes::from(data),
    }
}

/// Appends `values` as little-endian f32: one copy where memory is
/// little-endian, as the wire is.
fn extend_f32_le(data: &mut Vec<u8>, values: &[f32]) {
    #[cfg(target_endian = "little")]
    data.extend_from_slice(bytemuck::cast_slice(values));
    #[cfg(not(target_endian = "little"))]
    values
        .iter()
        .for_each(|value| data.extend_from_slice(&value.to_le_bytes()));
}

/// Encodes rows `rows` of `values` (`[_, width]`) as one f32 tensor
/// `[rows.len(), width]`, copying each row once, straight into the wire
/// bytes: what a router sends an expert node, the tokens it needs.
pub fn encode_rows(values: &[f32], width: usize, rows: &[u32]) -> Tensor {
    let mut data = Vec::with_capacity(rows.len() * width * size_of::<f32>());
    for &row in rows {
        extend_f32_le(
            &mut data,
            &values[row as usize * width..(row as usize + 1) * width],
        );
    }
    Tensor {
        dtype: WireDtype::F32.to_proto() as i32,
        shape: vec![rows.len() as u64, width as u64],
        data: Bytes::from(data),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn f32_round_trips_exactly(values in proptest::collection::vec(-1e30f32..1e30, 0..64)) {
            let rows = values.len() / 4;
            let values = &values[..rows * 4];
            let tensor = encode(values, &[rows, 4], WireDtype::F32);
            let decoded = decode_rows(Some(&tensor), 4).unwrap();
            prop_assert_eq!(decoded.values, values.to_vec());
            prop_assert_eq!(decoded.rows, rows);
        }

        #[test]
        fn the_first_non_finite_value_is_found_wherever_it_lies(
            len in 0usize..1200,
            bad in proptest::collection::vec((0usize..1200, 0usize..3), 0..3),
        ) {
            let mut values: Vec<f32> = (0..len).map(|index| index as f32 * -1e35).collect();
            for (at, kind) in bad {
                if at < len {
                    values[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][kind];
                }
            }
            let expected = values.iter().position(|value| !value.is_finite());
            prop_assert_eq!(first_non_finite(&values), expected);
        }

        #[test]
        fn half_types_round_within_their_precision(values in proptest::collection::vec(-100f32..100.0, 8)) {
            for (dtype, tolerance) in [(WireDtype::Bf16, 1.0 / 128.0), (WireDtype::F16, 1.0 / 1024.0)] {
                let decoded = decode_rows(Some(&encode(&values, &[2, 4], dtype)), 4).unwrap();
                for (got, want) in decoded.values.iter().zip(&values) {
                    prop_assert!((got - want).abs() <= tolerance * want.abs().max(1e-3));
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64),
                                       dtype in 0i32..5, shape in proptest::collection::vec(0u64..1 << 40, 0..4)) {
            let tensor = Tensor { dtype, shape, data: Bytes::from(data) };
            let _ = decode_rows(Some(&tensor), 4);
        }
    }

    #[test]
    fn bad_tensors_name_the_problem() {
        let good = encode(&[0.0; 8], &[2, 4], WireDtype::F32);
        let error =
            |tensor: Tensor, width| decode_rows(Some(&tensor), width).unwrap_err().to_string();
        assert!(error(good.clone(), 5).contains("hidden size is 4, this model's is 5"));
        let short = Tensor {
            data: good.data.slice(..31),
            ..good.clone()
        };
        assert!(error(short, 4).contains("needs 32 bytes, got 31"));
        let flat = Tensor {
            shape: vec![8],
            ..good.clone()
        };
        assert!(error(flat, 4).contains("2-d"));
        let unspecified = Tensor {
            dtype: 0,
            ..good.clone()
        };
        assert!(error(unspecified, 4).contains("unspecified"));
        let nan = encode(
            &[0.0, 0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0, 0.0],
            &[2, 4],
            WireDtype::F32,
        );
        assert!(error(nan, 4).contains("token 1, column 1 is NaN"));
        let infinite = encode(&[f32::INFINITY, 0.0, 0.0, 0.0], &[1, 4], WireDtype::F32);
        assert!(error(infinite, 4).contains("inf"));
        assert!(
            decode_rows(None, 4)
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }

    #[test]
    fn the_header_gives_the_rows_without_decoding_them() {
        let tensor = encode(&[1.0; 12], &[3, 4], WireDtype::Bf16);
        assert_eq!(
            check_rows_header(Some(&tensor), 4).unwrap(),
            RowsHeader {
                rows: 3,
                wire_dtype: WireDtype::Bf16
            }
        );
        let short = Tensor {
            data: tensor.data.slice(..23),
            ..tensor.clone()
        };
        let error = check_rows_header(Some(&short), 4).unwrap_err().to_string();
        assert!(error.contains("needs 24 bytes, got 23"), "{error}");
    }

    #[test]
    fn overflowed_outputs_name_the_first_value() {
        check_no_overflow(&[f32::MAX, -f32::MAX, 0.0, 1e-45], 2).unwrap();
        let error = check_no_overflow(&[1.0, 2.0, 3.0, f32::NEG_INFINITY, f32::NAN], 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "inputs out of range: the output of token 1, column 1 overflows f32 (-inf)"
        );
    }

    #[test]
    fn encoded_rows_are_the_chosen_rows_in_their_order() {
        let values: Vec<f32> = (0..12).map(|value| value as f32 * 0.5 - 1.0).collect();
        let tensor = encode_rows(&values, 3, &[3, 0, 3]);
        let chosen: Vec<f32> = [3, 0, 3]
            .iter()
            .flat_map(|&row| values[row * 3..row * 3 + 3].to_vec())
            .collect();
        assert_eq!(tensor, encode(&chosen, &[3, 3], WireDtype::F32));
        assert_eq!(encode_rows(&values, 3, &[]).shape, vec![0, 3]);
    }

    #[test]
    fn empty_batch_decodes_to_no_rows() {
        let rows = decode_rows(Some(&encode(&[], &[0, 4], WireDtype::Bf16)), 4).unwrap();
        assert_eq!(rows.rows, 0);
        assert!(rows.values.is_empty());
    }
}
