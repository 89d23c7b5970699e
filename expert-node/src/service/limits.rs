//! What one Compute request may ask of an expert node, from the model's
//! dimensions and the wire's message limit.
//!
//! Every size is checked from the request's fields before anything is
//! decoded or allocated for it: a small message that names many rows for
//! many experts would otherwise make the node allocate its output,
//! Σ rows × hidden floats, first.

use moemesh_core::model::config::ModelConfig;
use moemesh_proto::MAX_MESSAGE_BYTES;

use crate::{ExpertNodeError, ExpertNodeResult};

/// Most tokens one Compute request may carry, whatever the hidden size: a
/// whole long-context prefill of one layer. Large hidden sizes reach the
/// message limit first.
pub const MAX_ROWS_PER_REQUEST: usize = 1 << 16;

/// Bytes of a reply besides its rows: the tensor's dtype and shape, the
/// compute time and protobuf framing.
const REPLY_FRAMING_BYTES: usize = 4096;

/// Bytes of a request besides its rows and routing lists: the model id,
/// the tensor's dtype and shape, and protobuf framing.
const REQUEST_FRAMING_BYTES: usize = 64 * 1024;

/// Bytes one token-expert pair may take in a request: its row index (a
/// varint of up to 5 bytes) and its weight (4 bytes), with room for an
/// encoder that writes them unpacked, each behind its own tag.
const BYTES_PER_PAIR: usize = 16;

/// Bytes one expert's entry may take in a request besides its pairs.
const BYTES_PER_EXPERT: usize = 32;

/// The sizes one Compute request may have on a node of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeLimits {
    pub hidden_size: usize,
    /// Addressable experts per layer, the shared expert included.
    pub experts_per_layer: usize,
    /// Experts one token is routed to: top-k, and the shared expert where
    /// the model has one. A router sends a token to a node once with those
    /// of its experts that the node holds.
    pub experts_per_token: usize,
    /// Most tokens (input rows) in one request.
    pub max_rows: usize,
    /// Most token-expert pairs in one request: the reply holds one f32 row
    /// per pair and must fit in one message.
    pub max_pairs: usize,
}

impl ComputeLimits {
    /// The limits of a node serving `config`.
    pub fn for_model(config: &ModelConfig) -> Self {
        let row_bytes = config.hidden_size.max(1) * size_of::<f32>();
        let rows_in_a_message = (MAX_MESSAGE_BYTES - REPLY_FRAMING_BYTES) / row_bytes;
        Self {
            hidden_size: config.hidden_size,
            experts_per_layer: config.experts_per_layer(),
            experts_per_token: config.top_k + usize::from(config.has_shared_expert()),
            max_rows: MAX_ROWS_PER_REQUEST.min(rows_in_a_message),
            max_pairs: rows_in_a_message,
        }
    }

    /// The largest request a router sends within these limits, in bytes:
    /// the servers' decoding limit, so that nothing larger is buffered
    /// and decoded before the handler can refuse it.
    pub fn max_request_bytes(&self) -> usize {
        let pairs = self.max_pairs.min(self.max_rows * self.experts_per_token);
        let bytes = self.max_rows * self.hidden_size * size_of::<f32>()
            + pairs * BYTES_PER_PAIR
            + self.experts_per_layer * BYTES_PER_EXPERT
            + REQUEST_FRAMING_BYTES;
        bytes.min(MAX_MESSAGE_BYTES)
    }

    /// Refuses a request of more than `max_rows` tokens.
    pub fn check_rows(&self, rows: usize) -> ExpertNodeResult<()> {
        if rows > self.max_rows {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "request too large: {rows} rows; a node takes at most {} rows per request \
                 at hidden size {} (split the batch)",
                self.max_rows, self.hidden_size
            )));
        }
        Ok(())
    }

    /// Refuses a request whose `pairs` token-expert pairs over `rows`
    /// tokens give some token more experts than the model routes it to, or
    /// whose reply would not fit in one message.
    pub fn check_pairs(&self, pairs: usize, rows: usize) -> ExpertNodeResult<()> {
        let most_for_rows = rows.saturating_mul(self.experts_per_token);
        if pairs > most_for_rows {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "request assigns {pairs} token-expert pairs to {rows} rows; this model routes \
                 a token to at most {} experts, so at most {most_for_rows}",
                self.experts_per_token
            )));
        }
        if pairs > self.max_pairs {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "request too large: {pairs} token-expert pairs; a node answers at most {} per \
                 request at hidden size {}, or the reply would exceed the {} MiB message limit \
                 (split the batch)",
                self.max_pairs,
                self.hidden_size,
                MAX_MESSAGE_BYTES >> 20
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hidden: usize, top_k: usize) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"model_type":"qwen2_moe","hidden_size":{hidden},"num_hidden_layers":2,
                "moe_intermediate_size":4,"shared_expert_intermediate_size":8,
                "num_experts":8,"num_experts_per_tok":{top_k}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn small_models_are_limited_by_rows_and_large_ones_by_the_message() {
        let small = ComputeLimits::for_model(&config(64, 2));
        assert_eq!(small.experts_per_token, 3);
        assert_eq!(small.experts_per_layer, 9);
        assert_eq!(small.max_rows, MAX_ROWS_PER_REQUEST);
        assert_eq!(small.max_pairs, (MAX_MESSAGE_BYTES - 4096) / 256);
        // Sixteen MiB of rows, their routing lists and framing: far below
        // the wire's limit.
        let request = small.max_request_bytes();
        assert!(request > (1 << 16) * 64 * 4, "{request}");
        assert!(request < 24 << 20, "{request}");

        let large = ComputeLimits::for_model(&config(7168, 2));
        assert_eq!(large.max_rows, (MAX_MESSAGE_BYTES - 4096) / (7168 * 4));
        assert_eq!(large.max_pairs, large.max_rows);
        assert_eq!(large.max_request_bytes(), MAX_MESSAGE_BYTES);
    }

    #[test]
    fn each_limit_names_the_value_and_the_limit() {
        let limits = ComputeLimits {
            hidden_size: 4,
            experts_per_layer: 9,
            experts_per_token: 3,
            max_rows: 10,
            max_pairs: 20,
        };
        limits.check_rows(10).unwrap();
        let error = limits.check_rows(11).unwrap_err().to_string();
        assert!(error.contains("11 rows"), "{error}");
        assert!(error.contains("at most 10 rows"), "{error}");

        limits.check_pairs(6, 2).unwrap();
        let error = limits.check_pairs(7, 2).unwrap_err().to_string();
        assert!(error.contains("7 token-expert pairs to 2 rows"), "{error}");
        assert!(error.contains("at most 3 experts, so at most 6"), "{error}");

        limits.check_pairs(20, 10).unwrap();
        let error = limits.check_pairs(21, 10).unwrap_err().to_string();
        assert!(error.contains("21 token-expert pairs"), "{error}");
        assert!(error.contains("at most 20 per request"), "{error}");
        assert!(error.contains("256 MiB"), "{error}");
    }
}
