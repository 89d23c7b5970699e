//! The model families moemesh serves.

use crate::{CoreError, CoreResult};

/// The model families moemesh serves, named by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `mixtral`: softmax, top-k, always renormalised; no shared expert.
    Mixtral,
    /// `qwen2_moe`: softmax, top-k, optional renormalisation; one shared
    /// expert scaled by a sigmoid gate.
    Qwen2Moe,
    /// `qwen3_moe`: softmax, top-k, optional renormalisation; no shared expert.
    Qwen3Moe,
    /// `deepseek_v3`: sigmoid scores, a selection-only bias, group-limited
    /// top-k, a routed scaling factor and shared experts with weight one.
    DeepseekV3,
    /// `olmoe`: softmax, top-k, optional renormalisation (off by default);
    /// every layer MoE, no shared expert.
    Olmoe,
    /// `glm4_moe` (GLM-4.5, GLM-4.6): DeepSeek-V3's routing and shared
    /// experts under DeepSeek-V3's config fields and tensor names.
    Glm4Moe,
    /// `deepseek_v2`: softmax scores, greedy or group-limited greedy top-k
    /// (groups ranked by their best expert), a routed scaling factor, no
    /// renormalisation; shared experts with weight one.
    DeepseekV2,
    /// `phimoe` (Phi-3.5-MoE): sparsemixer's two experts, each weighted by
    /// a softmax over the logits near its own; Mixtral's tensor names.
    Phimoe,
    /// `granitemoe`: softmax over the top-k logits; gate and up fused in
    /// stacked `input_linear`; no shared expert.
    GraniteMoe,
    /// `granitemoeshared`: `granitemoe` plus an ungated shared MLP.
    GraniteMoeShared,
    /// `dbrx`: softmax, top-k, divided by their sum; experts stacked in
    /// `w1`, `v1`, `w2`.
    Dbrx,
    /// `gpt_oss`: softmax over the top-k logits of a biased router;
    /// experts with biases and a clamped SwiGLU, in MXFP4 as published.
    GptOss,
    /// `llama4_text` (and the text model of `llama4`): the sigmoid of each
    /// top-k logit scales the expert's input; a shared expert with weight
    /// one; experts stacked as `x · W`.
    Llama4Text,
    /// `longcat_flash`: softmax over the routed and the zero (identity)
    /// experts, a selection-only bias, weights times a scaling factor.
    LongcatFlash,
}

impl Family {
    /// Parses `config.json`'s `model_type`.
    pub fn from_model_type(model_type: &str) -> CoreResult<Self> {
        match model_type {
            "mixtral" => Ok(Self::Mixtral),
            "qwen2_moe" => Ok(Self::Qwen2Moe),
            "qwen3_moe" => Ok(Self::Qwen3Moe),
            "deepseek_v3" => Ok(Self::DeepseekV3),
            "olmoe" => Ok(Self::Olmoe),
            "glm4_moe" => Ok(Self::Glm4Moe),
            "deepseek_v2" => Ok(Self::DeepseekV2),
            "phimoe" => Ok(Self::Phimoe),
            "granitemoe" => Ok(Self::GraniteMoe),
            "granitemoeshared" => Ok(Self::GraniteMoeShared),
            "dbrx" => Ok(Self::Dbrx),
            "gpt_oss" => Ok(Self::GptOss),
            "llama4_text" => Ok(Self::Llama4Text),
            "longcat_flash" => Ok(Self::LongcatFlash),
            other => Err(CoreError::Config(format!(
                "model_type {other:?} is not supported; expected mixtral, qwen2_moe, qwen3_moe, \
                 deepseek_v2, deepseek_v3, glm4_moe, olmoe, phimoe, granitemoe, granitemoeshared, \
                 dbrx, gpt_oss, llama4 / llama4_text or longcat_flash"
            ))),
        }
    }

    /// Returns `config.json`'s `model_type` for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::DeepseekV3 => "deepseek_v3",
            Self::Olmoe => "olmoe",
            Self::Glm4Moe => "glm4_moe",
            Self::DeepseekV2 => "deepseek_v2",
            Self::Phimoe => "phimoe",
            Self::GraniteMoe => "granitemoe",
            Self::GraniteMoeShared => "granitemoeshared",
            Self::Dbrx => "dbrx",
            Self::GptOss => "gpt_oss",
            Self::Llama4Text => "llama4_text",
            Self::LongcatFlash => "longcat_flash",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}
