//! Hugging Face checkpoints: `config.json` plus safetensors weights, in one
//! `model.safetensors` or sharded with `model.safetensors.index.json`.
//!
//! Files are memory-mapped and only the tensors a node asks for are read, so
//! a node holding four experts of a 100 GB model touches only their pages.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use moemesh_proto::codec::{WireDtype, decode_values};
use safetensors::tensor::{Dtype, Metadata};
use serde::Deserialize;

use crate::model::config::{Activation, Family, ModelConfig, Quantization};
use crate::model::quantized;

mod projections;
use crate::{CoreError, CoreResult};
pub use projections::{Projection, ProjectionLayout};

/// One memory-mapped safetensors file and its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Length of the 8-byte length prefix plus the JSON header.
    data_start: usize,
    metadata: Metadata,
}

/// An open checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<Shard>,
    /// Tensor name to index in `shards`.
    tensor_shard: HashMap<String, usize>,
}

/// A tensor found in its shard.
struct Located<'a> {
    info: &'a safetensors::tensor::TensorInfo,
    mmap: &'a Mmap,
    range: std::ops::Range<usize>,
    bytes: &'a [u8],
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The three projections of one expert as stored: `[out, in]`, f32.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// `gate_proj` / `w1`: `[intermediate, hidden]`.
    pub gate_proj: Vec<f32>,
    /// `up_proj` / `w3`: `[intermediate, hidden]`.
    pub up_proj: Vec<f32>,
    /// `down_proj` / `w2`: `[hidden, intermediate]`.
    pub down_proj: Vec<f32>,
    /// What the expert computes between its projections.
    pub activation: Activation,
    /// The projections' biases, where the family has them (gpt-oss).
    pub biases: Option<ExpertBiases>,
}

/// An expert's projection biases, added to each projection's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBiases {
    /// `[intermediate]`.
    pub gate: Vec<f32>,
    /// `[intermediate]`.
    pub up: Vec<f32>,
    /// `[hidden]`.
    pub down: Vec<f32>,
}

/// How a stored tensor's bytes encode its values.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoding {
    /// Little-endian values of this dtype.
    Plain(WireDtype),
    /// Little-endian values of this dtype holding `[in, columns]`, used as
    /// `x · W`; the projection's row `o` is column `first + o · step`
    /// (Llama 4's, gpt-oss's and DBRX's stacked experts).
    Transposed {
        dtype: WireDtype,
        columns: usize,
        first: usize,
        step: usize,
    },
    /// MXFP4 rows `first, first + step, …` of a `[rows, groups · 32]`
    /// matrix: the bytes hold every row's `groups × 16` bytes, `scales`
    /// every row's `groups` exponents.
    Mxfp4Rows {
        groups: usize,
        scales: Vec<u8>,
        first: usize,
        step: usize,
    },
    /// FP8 e4m3, a `[rows, columns]` matrix with one scale per `block`
    /// tile (its `.weight_scale_inv`, widened to f32).
    Fp8Blocks {
        shape: [usize; 2],
        block: [usize; 2],
        scales: Vec<f32>,
    },
}

/// One tensor as the checkpoint stores it, borrowed from the memory map.
pub struct StoredTensor<'a> {
    pub encoding: Encoding,
    pub bytes: &'a [u8],
    /// Rows of the matrix its values make (`shape[0]`).
    out_rows: usize,
    mmap: &'a Mmap,
    range: std::ops::Range<usize>,
}

impl StoredTensor<'_> {
    /// The values widened to f32: exact for the plain dtypes, dequantized
    /// as the reference does for the quantized ones.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.encoding {
            Encoding::Plain(dtype) => decode_values(self.bytes, *dtype),
            Encoding::Transposed {
                dtype,
                columns,
                first,
                step,
            } => projections::transpose_columns(
                &decode_values(self.bytes, *dtype),
                *columns,
                *first,
                *step,
                self.out_rows,
            ),
            Encoding::Mxfp4Rows {
                groups,
                scales,
                first,
                step,
            } => (0..self.out_rows)
                .flat_map(|row| {
                    let row = first + row * step;
                    quantized::dequantize_mxfp4(
                        &self.bytes[row * groups * 16..(row + 1) * groups * 16],
                        &scales[row * groups..(row + 1) * groups],
                    )
                })
                .collect(),
            Encoding::Fp8Blocks {
                shape,
                block,
                scales,
            } => quantized::dequantize_fp8_blocks(self.bytes, *shape, scales, *block),
        }
    }

    /// Drops the tensor's mapped pages from this process's resident memory
    /// once its values are copied out; they stay in the page cache, and a
    /// later read faults them back in from there.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only; dropping its pages only makes
        // the next read of them fault them back in from the file.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            );
        }
    }
}

/// The three projections of one expert as stored: `[out, in]`.
pub struct StoredExpert<'a> {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub gate_proj: StoredTensor<'a>,
    pub up_proj: StoredTensor<'a>,
    pub down_proj: StoredTensor<'a>,
}

/// The router-side weights of one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GateWeights {
    /// `gate.weight`: `[num_experts, hidden]`.
    pub weight: Vec<f32>,
    /// DeepSeek-V3's `e_score_correction_bias`: `[num_experts]`.
    pub score_correction_bias: Option<Vec<f32>>,
    /// gpt-oss's `router.bias`, added to every logit: `[num_experts]`.
    pub logit_bias: Option<Vec<f32>>,
    /// Qwen2-MoE's `shared_expert_gate.weight`: `[1, hidden]`.
    pub shared_expert_gate: Option<Vec<f32>>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CoreError + '_ {
    move |source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Shard {
    fn open(path: PathBuf) -> CoreResult<Self> {
        let file = File::open(&path).map_err(io_error(&path))?;
        // SAFETY: checkpoints are read-only inputs; moemesh never writes them
        // while serving, and a concurrent external writer is an operator error.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_error(&path))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|error| CoreError::Checkpoint(format!("{}: {error}", path.display())))?;
        Ok(Self {
            path,
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

impl Checkpoint {
    /// Opens a model directory: reads `config.json` and maps the weights.
    pub fn open(dir: &Path) -> CoreResult<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let index_path = dir.join("model.safetensors.index.json");
        let single_path = dir.join("model.safetensors");
        let mut shards = Vec::new();
        let mut tensor_shard = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_error(&index_path))?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|error| {
                CoreError::Checkpoint(format!("{}: {error}", index_path.display()))
            })?;
            let mut file_names: Vec<&String> = index.weight_map.values().collect();
            file_names.sort();
            file_names.dedup();
            let mut shard_of_file = HashMap::new();
            for file_name in file_names {
                if file_name.contains('/') || file_name.contains("..") {
                    return Err(CoreError::Checkpoint(format!(
                        "shard name {file_name:?} leaves the model directory"
                    )));
                }
                shard_of_file.insert(file_name.clone(), shards.len());
                shards.push(Shard::open(dir.join(file_name))?);
            }
            for (name, file_name) in index.weight_map {
                tensor_shard.insert(name, shard_of_file[&file_name]);
            }
        } else if single_path.exists() {
            let shard = Shard::open(single_path)?;
            for name in shard.metadata.tensors().keys() {
                tensor_shard.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(CoreError::Checkpoint(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensor_shard,
        })
    }

    /// Returns the validated model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Reads one tensor as f32, checking its shape; f32, bf16 and f16 are accepted.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> CoreResult<Vec<f32>> {
        let stored = self.stored_tensor(name, shape)?;
        let values = stored.to_f32();
        // The values are copied out: drop the mapped pages from this
        // process's resident memory, so that a node holds its weights once
        // rather than twice.
        stored.release_pages();
        Ok(values)
    }

    /// A tensor's storage dtype as safetensors names it (`F32`, `BF16`,
    /// `F8_E4M3`, `U8`, ...) and its shape, unchecked: for reports such as
    /// `moectl model inspect`. None when the checkpoint lacks it.
    pub fn tensor_dtype_and_shape(&self, name: &str) -> Option<(String, Vec<usize>)> {
        let shard = &self.shards[*self.tensor_shard.get(name)?];
        let info = shard.metadata.info(name)?;
        Some((format!("{:?}", info.dtype), info.shape.clone()))
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_shard.contains_key(name)
    }

    /// One tensor as stored, in the memory map, its shape and length checked.
    pub fn stored_tensor(&self, name: &str, shape: &[usize]) -> CoreResult<StoredTensor<'_>> {
        let located = self.locate(name)?;
        let info = located.info;
        if info.shape != shape {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} has shape {:?}, config.json implies {shape:?}",
                info.shape
            )));
        }
        let (mmap, range, bytes) = (located.mmap, located.range, located.bytes);
        let (encoding, value_size) = match info.dtype {
            Dtype::F32 => (Encoding::Plain(WireDtype::F32), 4),
            Dtype::BF16 => (Encoding::Plain(WireDtype::Bf16), 2),
            Dtype::F16 => (Encoding::Plain(WireDtype::F16), 2),
            Dtype::F8_E4M3 => (self.fp8_encoding(name, shape)?, 1),
            other => {
                return Err(CoreError::Checkpoint(format!(
                    "tensor {name} is {other:?}; moemesh reads F32, BF16, F16 and F8_E4M3 \
                     with block scales"
                )));
            }
        };
        let elements: usize = shape.iter().product();
        if bytes.len() != elements * value_size {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} has {} bytes for {elements} elements",
                bytes.len()
            )));
        }
        Ok(StoredTensor {
            encoding,
            bytes,
            out_rows: shape.first().copied().unwrap_or(1),
            mmap,
            range,
        })
    }

    /// Where tensor `name` lies: its shard's header entry and its bytes.
    fn locate(&self, name: &str) -> CoreResult<Located<'_>> {
        let &shard_index = self.tensor_shard.get(name).ok_or_else(|| {
            CoreError::Checkpoint(format!(
                "tensor {name} is missing from {}",
                self.dir.display()
            ))
        })?;
        let shard = &self.shards[shard_index];
        let info = shard.metadata.info(name).ok_or_else(|| {
            CoreError::Checkpoint(format!(
                "the index puts {name} in {}, which lacks it",
                shard.path.display()
            ))
        })?;
        let (start, end) = info.data_offsets;
        let range = shard.data_start + start..shard.data_start + end;
        let bytes = shard.mmap.get(range.clone()).ok_or_else(|| {
            CoreError::Checkpoint(format!(
                "tensor {name} lies outside {}",
                shard.path.display()
            ))
        })?;
        Ok(Located {
            info,
            mmap: &shard.mmap,
            range,
            bytes,
        })
    }

    /// The bytes of a tensor of one-byte values (FP8, E8M0, U8), its
    /// shape checked against `shape`.
    fn byte_tensor(&self, name: &str, shape: &[usize]) -> CoreResult<&[u8]> {
        let located = self.locate(name)?;
        let elements: usize = shape.iter().product();
        if located.info.shape != shape || located.bytes.len() != elements {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} is {:?} of shape {:?}; moemesh expects one byte per value in \
                 {shape:?}",
                located.info.dtype, located.info.shape
            )));
        }
        Ok(located.bytes)
    }

    /// The encoding of FP8 weight `name`: its scales, in the blocks the
    /// config's `quantization_config` gives.
    fn fp8_encoding(&self, name: &str, shape: &[usize]) -> CoreResult<Encoding> {
        let Some(Quantization::Fp8Blocks { block }) = self.config.quantization else {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} is F8_E4M3, but config.json has no fp8 quantization_config \
                 to say how it is scaled"
            )));
        };
        let &[rows, columns] = shape else {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} is F8_E4M3 of shape {shape:?}; moemesh reads FP8 matrices"
            )));
        };
        let scale_name = format!("{name}_scale_inv");
        let (_, scale_shape) = self.tensor_dtype_and_shape(&scale_name).ok_or_else(|| {
            CoreError::Checkpoint(format!(
                "tensor {name} is F8_E4M3 and {scale_name} is missing from {}",
                self.dir.display()
            ))
        })?;
        quantized::check_fp8_scale_grid(name, [rows, columns], block, &scale_shape)?;
        Ok(Encoding::Fp8Blocks {
            shape: [rows, columns],
            block: if scale_shape.iter().product::<usize>() == 1 {
                [rows, columns]
            } else {
                block
            },
            scales: self.load_scales(&scale_name, &scale_shape)?,
        })
    }

    /// Scales as f32: stored as F32 or BF16, or as E8M0 exponents (UE8M0).
    fn load_scales(&self, name: &str, shape: &[usize]) -> CoreResult<Vec<f32>> {
        let (dtype, _) = self.tensor_dtype_and_shape(name).unwrap_or_default();
        if dtype == "F8_E8M0" || dtype == "U8" {
            let bytes = self.byte_tensor(name, shape)?;
            return Ok(bytes
                .iter()
                .map(|&byte| quantized::e8m0_to_f32(byte))
                .collect());
        }
        self.load_f32(name, shape)
    }

    /// Loads the router-side weights of one MoE layer.
    pub fn load_gate(&self, layer: usize) -> CoreResult<GateWeights> {
        self.check_moe_layer(layer)?;
        let prefix = self.layer_prefix(layer);
        let config = &self.config;
        let hidden = config.hidden_size;
        let gate_experts = config.gate_experts();
        let weight = self.load_f32(&self.gate_tensor_name(layer), &[gate_experts, hidden])?;
        let score_correction_bias = match config.family {
            Family::DeepseekV3 | Family::Glm4Moe => Some(self.load_f32(
                &format!("{prefix}.gate.e_score_correction_bias"),
                &[gate_experts],
            )?),
            Family::LongcatFlash => Some(self.load_f32(
                &format!("{prefix}.router.e_score_correction_bias"),
                &[gate_experts],
            )?),
            _ => None,
        };
        let logit_bias = match config.family {
            Family::GptOss => {
                Some(self.load_f32(&format!("{prefix}.router.bias"), &[config.num_experts])?)
            }
            _ => None,
        };
        let shared_expert_gate = match config.family {
            Family::Qwen2Moe => {
                Some(self.load_f32(&format!("{prefix}.shared_expert_gate.weight"), &[1, hidden])?)
            }
            _ => None,
        };
        Ok(GateWeights {
            weight,
            score_correction_bias,
            logit_bias,
            shared_expert_gate,
        })
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use safetensors::tensor::TensorView;

    use super::*;

    const CONFIG: &str = r#"{"model_type":"qwen3_moe","hidden_size":2,"num_hidden_layers":1,
        "moe_intermediate_size":3,"num_experts":2,"num_experts_per_tok":1}"#;

    fn write(dir: &Path, file: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (
                    name.to_string(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect()
    }

    #[test]
    fn reads_each_storage_dtype_and_names_missing_or_misshapen_tensors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        let halves: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16s: Vec<u8> = [0.25f32, 8.0]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        write(
            dir.path(),
            "model.safetensors",
            &[
                ("a", Dtype::F32, vec![1, 2], f32_bytes(&[1.0, 2.0])),
                ("b", Dtype::BF16, vec![2], halves),
                ("c", Dtype::F16, vec![2], f16s),
                ("d", Dtype::I64, vec![1], vec![0; 8]),
            ],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.load_f32("a", &[1, 2]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(checkpoint.load_f32("b", &[2]).unwrap(), vec![1.5, -2.0]);
        assert_eq!(checkpoint.load_f32("c", &[2]).unwrap(), vec![0.25, 8.0]);
        let error =
            |name: &str, shape: &[usize]| checkpoint.load_f32(name, shape).unwrap_err().to_string();
        assert!(error("a", &[2, 1]).contains("has shape [1, 2], config.json implies [2, 1]"));
        assert!(error("d", &[1]).contains("is I64"));
        assert!(error("model.layers.0.mlp.gate.weight", &[2, 2]).contains("is missing"));
        assert!(
            checkpoint
                .load_expert(0, 2)
                .unwrap_err()
                .to_string()
                .contains("expert 2 does not exist")
        );
    }

    #[test]
    fn fp8_tensors_are_dequantized_with_their_block_scales_or_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = CONFIG.replace(
            r#""num_experts_per_tok":1"#,
            r#""num_experts_per_tok":1,"quantization_config":{"quant_method":"fp8",
                "weight_block_size":[2,2]}"#,
        );
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        // 3 × 5 values of 1.0 (0x38) but one of 1.5 (0x3c); 2 × 3 scales.
        let mut ones = vec![0x38u8; 15];
        ones[7] = 0x3c;
        let scales = f32_bytes(&[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]);
        write(
            dir.path(),
            "model.safetensors",
            &[
                ("a.weight", Dtype::F8_E4M3, vec![3, 5], ones.clone()),
                ("a.weight_scale_inv", Dtype::F32, vec![2, 3], scales.clone()),
                ("b.weight", Dtype::F8_E4M3, vec![3, 5], ones.clone()),
                ("c.weight", Dtype::F8_E4M3, vec![3, 5], ones),
                ("c.weight_scale_inv", Dtype::F32, vec![3, 2], scales),
            ],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let values = checkpoint.load_f32("a.weight", &[3, 5]).unwrap();
        assert_eq!(&values[5..10], &[1.0, 1.0, 3.0, 2.0, 3.0]);
        assert_eq!(values[14], 30.0);
        let error = |name: &str| checkpoint.load_f32(name, &[3, 5]).unwrap_err().to_string();
        assert!(error("b.weight").contains("b.weight_scale_inv is missing"));
        assert!(
            error("c.weight").contains("needs [2, 3]"),
            "{}",
            error("c.weight")
        );
    }

    #[test]
    fn sharded_checkpoints_follow_their_index_and_stay_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        write(
            dir.path(),
            "part-1.safetensors",
            &[("x", Dtype::F32, vec![1], f32_bytes(&[3.0]))],
        );
        write(
            dir.path(),
            "part-2.safetensors",
            &[("y", Dtype::F32, vec![1], f32_bytes(&[4.0]))],
        );
        let index =
            r#"{"metadata":{},"weight_map":{"x":"part-1.safetensors","y":"part-2.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.load_f32("y", &[1]).unwrap(), vec![4.0]);
        assert_eq!(checkpoint.load_f32("x", &[1]).unwrap(), vec![3.0]);

        let escaping = r#"{"weight_map":{"x":"../elsewhere.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), escaping).unwrap();
        let error = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(error.contains("leaves the model directory"), "{error}");
    }

    #[test]
    fn a_directory_without_weights_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        let error = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            error.contains("neither model.safetensors nor model.safetensors.index.json"),
            "{error}"
        );
    }
}
