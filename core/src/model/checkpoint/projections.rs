//! Where each family's checkpoints keep an expert's three projections:
//! one `[out, in]` tensor each (Mixtral, Qwen, DeepSeek, ...), or slices of
//! tensors that stack every expert of a layer (Granite's fused
//! `input_linear`, DBRX's `w1`/`v1`/`w2`).

use moemesh_proto::codec::WireDtype;
use safetensors::tensor::Dtype;

use super::{Checkpoint, Encoding, ExpertBiases, ExpertWeights, StoredExpert, StoredTensor};
use crate::model::config::Family;
use crate::{CoreError, CoreResult};

/// One projection of one expert: the tensor that holds it and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    pub tensor: String,
    pub layout: ProjectionLayout,
}

/// How a projection's `[out, in]` matrix lies in its tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionLayout {
    /// The whole tensor.
    Matrix,
    /// Slice `expert` of `experts` stacked along the first dimension
    /// (`[experts, rows, columns]`, or `[experts · rows, columns]` as DBRX
    /// stores them). Untransposed, the slice is `[out…, in]` and the
    /// projection its rows `first..first + out` (gate and up fused one
    /// above the other); transposed, the slice is `[in, out…]`, used as
    /// `x · W`, and the projection's row `o` is column `first + o · step`.
    Stacked {
        expert: usize,
        experts: usize,
        rows: usize,
        columns: usize,
        transposed: bool,
        first: usize,
        step: usize,
    },
    /// MXFP4 as gpt-oss publishes its experts: `{tensor}_blocks`
    /// `[experts, rows, columns / 32, 16]` and `{tensor}_scales`
    /// `[experts, rows, columns / 32]`, bytes; expert `expert`'s slice
    /// dequantizes to `[rows, columns]` (`[out…, in]`), and the projection
    /// is its rows `first, first + step, …`.
    Mxfp4 {
        expert: usize,
        experts: usize,
        rows: usize,
        columns: usize,
        first: usize,
        step: usize,
    },
}

impl ProjectionLayout {
    /// Expert `expert` of `experts` in `[rows, columns]` slices used as
    /// `x · W`, the projection's row `o` from column `first + o · step`.
    fn columns_of(
        expert: usize,
        experts: usize,
        [rows, columns]: [usize; 2],
        first: usize,
        step: usize,
    ) -> Self {
        Self::Stacked {
            expert,
            experts,
            rows,
            columns,
            transposed: true,
            first,
            step,
        }
    }

    /// Expert `expert` of `experts` in untransposed `[rows, columns]`
    /// slices, from row `first`.
    fn rows_of(expert: usize, experts: usize, [rows, columns]: [usize; 2], first: usize) -> Self {
        Self::Stacked {
            expert,
            experts,
            rows,
            columns,
            transposed: false,
            first,
            step: 1,
        }
    }
}

/// `[out, in]` from `values` holding `[in, columns]`: row `o` is column
/// `first + o · step`.
pub(super) fn transpose_columns(
    values: &[f32],
    columns: usize,
    first: usize,
    step: usize,
    out: usize,
) -> Vec<f32> {
    let inputs = values.len() / columns;
    let mut transposed = Vec::with_capacity(out * inputs);
    for row in 0..out {
        let column = first + row * step;
        transposed.extend((0..inputs).map(|input| values[input * columns + column]));
    }
    transposed
}

impl Checkpoint {
    /// The module that holds layer `layer`'s router and routed experts.
    pub(super) fn layer_prefix(&self, layer: usize) -> String {
        match self.config.family {
            Family::Mixtral | Family::Phimoe | Family::GraniteMoe | Family::GraniteMoeShared => {
                format!("model.layers.{layer}.block_sparse_moe")
            }
            Family::Dbrx => format!("transformer.blocks.{layer}.ffn"),
            Family::Qwen2Moe
            | Family::Qwen3Moe
            | Family::DeepseekV2
            | Family::DeepseekV3
            | Family::Olmoe
            | Family::Glm4Moe
            | Family::GptOss
            | Family::LongcatFlash => format!("model.layers.{layer}.mlp"),
            Family::Llama4Text => format!(
                "{}model.layers.{layer}.feed_forward",
                self.config.tensor_prefix
            ),
        }
    }

    /// The router's weight of layer `layer`: `[num_experts, hidden]`.
    pub(super) fn gate_tensor_name(&self, layer: usize) -> String {
        let prefix = self.layer_prefix(layer);
        match self.config.family {
            Family::GraniteMoe | Family::GraniteMoeShared | Family::Dbrx => {
                format!("{prefix}.router.layer.weight")
            }
            Family::GptOss | Family::Llama4Text => format!("{prefix}.router.weight"),
            // Its `classifier.bias`, where there is one, is unused, as in
            // transformers' `LongcatFlashTopkRouter`.
            Family::LongcatFlash => format!("{prefix}.router.classifier.weight"),
            _ => format!("{prefix}.gate.weight"),
        }
    }

    pub(super) fn check_moe_layer(&self, layer: usize) -> CoreResult<()> {
        if self.config.is_moe_layer(layer) {
            Ok(())
        } else {
            Err(CoreError::NotFound(format!(
                "layer {layer} is not an MoE layer of this {} model (MoE layers: {:?})",
                self.config.family,
                self.config.moe_layers()
            )))
        }
    }

    /// Where expert `expert` of `layer` (the shared expert is
    /// `num_experts`) keeps its projections, in the order gate, up, down.
    pub fn expert_projections(&self, layer: usize, expert: u32) -> CoreResult<[Projection; 3]> {
        self.check_moe_layer(layer)?;
        let config = &self.config;
        if Some(expert) != config.shared_expert_id() && expert as usize >= config.num_experts {
            return Err(CoreError::NotFound(format!(
                "expert {expert} does not exist; layer {layer} has experts 0..{}{}",
                config.num_experts,
                if config.has_shared_expert() {
                    " and the shared expert"
                } else {
                    ""
                }
            )));
        }
        let prefix = self.layer_prefix(layer);
        let matrices = |names: [String; 3]| {
            names.map(|tensor| Projection {
                tensor,
                layout: ProjectionLayout::Matrix,
            })
        };
        let (hidden, intermediate) = (config.hidden_size, config.intermediate_size_of(expert));
        let (index, experts) = (expert as usize, config.num_experts);
        if Some(expert) == config.shared_expert_id() {
            return Ok(match config.family {
                // granitemoeshared: one ungated MLP beside the MoE block,
                // gate and up fused as the routed experts.
                Family::GraniteMoeShared => {
                    let shared = format!("model.layers.{layer}.shared_mlp");
                    fused_gate_up(&shared, 0, 1, [hidden, intermediate])
                }
                Family::Qwen2Moe | Family::Llama4Text => matrices(
                    ["gate_proj", "up_proj", "down_proj"]
                        .map(|proj| format!("{prefix}.shared_expert.{proj}.weight")),
                ),
                _ => matrices(
                    ["gate_proj", "up_proj", "down_proj"]
                        .map(|proj| format!("{prefix}.shared_experts.{proj}.weight")),
                ),
            });
        }
        Ok(match config.family {
            Family::Mixtral | Family::Phimoe => matrices(
                ["w1", "w3", "w2"].map(|proj| format!("{prefix}.experts.{expert}.{proj}.weight")),
            ),
            Family::GraniteMoe | Family::GraniteMoeShared => {
                fused_gate_up(&prefix, index, experts, [hidden, intermediate])
            }
            Family::Dbrx => dbrx_projections(&prefix, index, experts, [hidden, intermediate]),
            Family::GptOss => self.gpt_oss_projections(&prefix, index, [hidden, intermediate]),
            Family::Llama4Text => {
                llama4_projections(&prefix, index, experts, [hidden, intermediate])
            }
            _ => matrices(
                ["gate_proj", "up_proj", "down_proj"]
                    .map(|proj| format!("{prefix}.experts.{expert}.{proj}.weight")),
            ),
        })
    }

    /// gpt-oss's experts: gate and up interleaved (gate even, up odd) in
    /// `gate_up_proj`. As published, MXFP4 in `[out, in]` order; as
    /// transformers saves them dequantized, `gate_up_proj [E, hidden, 2 ·
    /// intermediate]` and `down_proj [E, intermediate, hidden]`, used as
    /// `x · W`.
    fn gpt_oss_projections(
        &self,
        prefix: &str,
        expert: usize,
        [hidden, intermediate]: [usize; 2],
    ) -> [Projection; 3] {
        let experts = self.config.num_experts;
        let gate_up = format!("{prefix}.experts.gate_up_proj");
        let down = format!("{prefix}.experts.down_proj");
        let mxfp4 = self.has_tensor(&format!("{gate_up}_blocks"));
        let interleaved = |first| match mxfp4 {
            true => ProjectionLayout::Mxfp4 {
                expert,
                experts,
                rows: 2 * intermediate,
                columns: hidden,
                first,
                step: 2,
            },
            false => {
                ProjectionLayout::columns_of(expert, experts, [hidden, 2 * intermediate], first, 2)
            }
        };
        let down_layout = match mxfp4 {
            true => ProjectionLayout::Mxfp4 {
                expert,
                experts,
                rows: hidden,
                columns: intermediate,
                first: 0,
                step: 1,
            },
            false => ProjectionLayout::columns_of(expert, experts, [intermediate, hidden], 0, 1),
        };
        [
            Projection {
                tensor: gate_up.clone(),
                layout: interleaved(0),
            },
            Projection {
                tensor: gate_up,
                layout: interleaved(1),
            },
            Projection {
                tensor: down,
                layout: down_layout,
            },
        ]
    }

    /// Expert `expert`'s MXFP4 rows, its blocks and scales checked.
    fn stored_mxfp4(
        &self,
        name: &str,
        [expert, experts, rows, columns]: [usize; 4],
        [out, first, step]: [usize; 3],
    ) -> CoreResult<StoredTensor<'_>> {
        let groups = columns / 32;
        let blocks_name = format!("{name}_blocks");
        let blocks = self.locate(&blocks_name)?;
        let scales = self.byte_tensor(&format!("{name}_scales"), &[experts, rows, groups])?;
        if columns % 32 != 0
            || blocks.info.dtype != Dtype::U8
            || blocks.info.shape != [experts, rows, groups, 16]
        {
            return Err(CoreError::Checkpoint(format!(
                "tensor {blocks_name} is {:?} of shape {:?}; MXFP4 experts of {rows} × {columns} \
                 need U8 [{experts}, {rows}, {groups}, 16]",
                blocks.info.dtype, blocks.info.shape
            )));
        }
        let slice = rows * groups * 16;
        let bytes = expert * slice..(expert + 1) * slice;
        debug_assert!(first + (out - 1) * step < rows);
        Ok(StoredTensor {
            encoding: Encoding::Mxfp4Rows {
                groups,
                scales: scales[expert * rows * groups..(expert + 1) * rows * groups].to_vec(),
                first,
                step,
            },
            bytes: &blocks.bytes[bytes.clone()],
            out_rows: out,
            mmap: blocks.mmap,
            range: blocks.range.start + bytes.start..blocks.range.start + bytes.end,
        })
    }

    /// gpt-oss's biases of expert `expert`: `gate_up_proj_bias [E, 2 ·
    /// intermediate]` interleaved as the weights, `down_proj_bias [E, hidden]`.
    fn expert_biases(&self, layer: usize, expert: usize) -> CoreResult<ExpertBiases> {
        let prefix = self.layer_prefix(layer);
        let config = &self.config;
        let experts = config.num_experts;
        let row = |name: String, width: usize| {
            let projection = Projection {
                tensor: name,
                layout: ProjectionLayout::rows_of(expert, experts, [1, width], 0),
            };
            Ok::<_, CoreError>(self.stored_projection(&projection, [1, width])?.to_f32())
        };
        let gate_up = row(
            format!("{prefix}.experts.gate_up_proj_bias"),
            2 * config.expert_intermediate_size,
        )?;
        Ok(ExpertBiases {
            gate: gate_up.iter().step_by(2).copied().collect(),
            up: gate_up.iter().skip(1).step_by(2).copied().collect(),
            down: row(
                format!("{prefix}.experts.down_proj_bias"),
                config.hidden_size,
            )?,
        })
    }

    /// One projection as stored, its shape checked: `[out, in]` values.
    fn stored_projection(
        &self,
        projection: &Projection,
        [out, input]: [usize; 2],
    ) -> CoreResult<StoredTensor<'_>> {
        let (expert, experts, rows, columns, transposed, first, step) = match projection.layout {
            ProjectionLayout::Matrix => {
                return self.stored_tensor(&projection.tensor, &[out, input]);
            }
            ProjectionLayout::Mxfp4 {
                expert,
                experts,
                rows,
                columns,
                first,
                step,
            } => {
                debug_assert_eq!(columns, input);
                return self.stored_mxfp4(
                    &projection.tensor,
                    [expert, experts, rows, columns],
                    [out, first, step],
                );
            }
            ProjectionLayout::Stacked {
                expert,
                experts,
                rows,
                columns,
                transposed,
                first,
                step,
            } => (expert, experts, rows, columns, transposed, first, step),
        };
        let name = &projection.tensor;
        let located = self.locate(name)?;
        let shape = &located.info.shape;
        if shape != &[experts, rows, columns] && shape != &[experts * rows, columns] {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} has shape {shape:?}, config.json implies [{experts}, {rows}, \
                 {columns}]"
            )));
        }
        let dtype = match located.info.dtype {
            Dtype::F32 => WireDtype::F32,
            Dtype::BF16 => WireDtype::Bf16,
            Dtype::F16 => WireDtype::F16,
            other => {
                return Err(CoreError::Checkpoint(format!(
                    "tensor {name} is {other:?}; moemesh reads stacked experts in F32, BF16 \
                     and F16"
                )));
            }
        };
        let size = dtype.size();
        let slice = rows * columns * size;
        if located.bytes.len() != experts * slice {
            return Err(CoreError::Checkpoint(format!(
                "tensor {name} has {} bytes for {} values",
                located.bytes.len(),
                experts * rows * columns
            )));
        }
        let expert_bytes = expert * slice..(expert + 1) * slice;
        let (encoding, bytes) = if transposed {
            debug_assert!(rows == input && first + (out - 1) * step < columns);
            let encoding = Encoding::Transposed {
                dtype,
                columns,
                first,
                step,
            };
            (encoding, expert_bytes)
        } else {
            debug_assert!(columns == input && first + out <= rows && step == 1);
            let start = expert_bytes.start + first * columns * size;
            (Encoding::Plain(dtype), start..start + out * columns * size)
        };
        let range = located.range.start + bytes.start..located.range.start + bytes.end;
        Ok(StoredTensor {
            encoding,
            bytes: &located.bytes[bytes],
            out_rows: out,
            mmap: located.mmap,
            range,
        })
    }

    /// The three projections of one expert as stored (the shared expert
    /// is `num_experts`), for backends that copy them as they are.
    pub fn stored_expert(&self, layer: usize, expert: u32) -> CoreResult<StoredExpert<'_>> {
        let [gate, up, down] = self.expert_projections(layer, expert)?;
        let hidden = self.config.hidden_size;
        let intermediate = self.config.intermediate_size_of(expert);
        Ok(StoredExpert {
            hidden_size: hidden,
            intermediate_size: intermediate,
            gate_proj: self.stored_projection(&gate, [intermediate, hidden])?,
            up_proj: self.stored_projection(&up, [intermediate, hidden])?,
            down_proj: self.stored_projection(&down, [hidden, intermediate])?,
        })
    }

    /// Loads the weights of one expert (the shared expert is `num_experts`).
    pub fn load_expert(&self, layer: usize, expert: u32) -> CoreResult<ExpertWeights> {
        let stored = self.stored_expert(layer, expert)?;
        let widen = |tensor: &StoredTensor<'_>| {
            let values = tensor.to_f32();
            // The values are copied out: drop the mapped pages from this
            // process's resident memory.
            tensor.release_pages();
            values
        };
        let biases = match self.config.expert_biases {
            true => Some(self.expert_biases(layer, expert as usize)?),
            false => None,
        };
        Ok(ExpertWeights {
            hidden_size: stored.hidden_size,
            intermediate_size: stored.intermediate_size,
            gate_proj: widen(&stored.gate_proj),
            up_proj: widen(&stored.up_proj),
            down_proj: widen(&stored.down_proj),
            activation: self.config.expert_activation,
            biases,
        })
    }
}

/// Granite's experts: `{prefix}.input_linear.weight` stacks `[2 ·
/// intermediate, hidden]` per expert, gate above up;
/// `{prefix}.output_linear.weight` stacks `[hidden, intermediate]`.
fn fused_gate_up(
    prefix: &str,
    expert: usize,
    experts: usize,
    [hidden, intermediate]: [usize; 2],
) -> [Projection; 3] {
    let input = format!("{prefix}.input_linear.weight");
    let fused = [2 * intermediate, hidden];
    [
        Projection {
            tensor: input.clone(),
            layout: ProjectionLayout::rows_of(expert, experts, fused, 0),
        },
        Projection {
            tensor: input,
            layout: ProjectionLayout::rows_of(expert, experts, fused, intermediate),
        },
        Projection {
            tensor: format!("{prefix}.output_linear.weight"),
            layout: ProjectionLayout::rows_of(expert, experts, [hidden, intermediate], 0),
        },
    ]
}

/// DBRX's experts: `w1` (gate) and `v1` (up) stack `[intermediate,
/// hidden]` per expert; `w2` stacks `[intermediate, hidden]` used as `x · W`.
fn dbrx_projections(
    prefix: &str,
    index: usize,
    experts: usize,
    [hidden, intermediate]: [usize; 2],
) -> [Projection; 3] {
    let stacked = |proj: &str| format!("{prefix}.experts.mlp.{proj}");
    let slice = [intermediate, hidden];
    [
        Projection {
            tensor: stacked("w1"),
            layout: ProjectionLayout::rows_of(index, experts, slice, 0),
        },
        Projection {
            tensor: stacked("v1"),
            layout: ProjectionLayout::rows_of(index, experts, slice, 0),
        },
        Projection {
            tensor: stacked("w2"),
            layout: ProjectionLayout::columns_of(index, experts, [intermediate, hidden], 0, 1),
        },
    ]
}

/// Llama 4's experts: `gate_up_proj [E, hidden, 2 · intermediate]`, gate
/// columns first, and `down_proj [E, intermediate, hidden]`, used as `x · W`.
fn llama4_projections(
    prefix: &str,
    index: usize,
    experts: usize,
    [hidden, intermediate]: [usize; 2],
) -> [Projection; 3] {
    let used_as_x_w = |tensor: &str, [rows, columns]: [usize; 2], first| Projection {
        tensor: format!("{prefix}.experts.{tensor}"),
        layout: ProjectionLayout::columns_of(index, experts, [rows, columns], first, 1),
    };
    let gate_up = [hidden, 2 * intermediate];
    [
        used_as_x_w("gate_up_proj", gate_up, 0),
        used_as_x_w("gate_up_proj", gate_up, intermediate),
        used_as_x_w("down_proj", [intermediate, hidden], 0),
    ]
}
