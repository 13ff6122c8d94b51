//! P8: attention inside control flow (Optimum's merged `If` decoder): refused.

use onnx_protobuf::{GraphProto, NodeProto};

use super::{node_label, Rejection};

/// P8: an `If`/`Loop` whose body holds attention (Optimum's merged decoder).
pub fn refuse_control_flow(n: &NodeProto) -> Option<Rejection> {
    let count: usize = n
        .attribute
        .iter()
        .flat_map(|a| a.g.as_ref().into_iter().chain(a.graphs.iter()))
        .map(count_attention)
        .sum();
    (count > 0).then(|| {
        Rejection::new(
            &node_label(n),
            "P8 merged decoder",
            "attention in the main graph",
            format!(
                "{} {count} attention anchor(s) inside its subgraphs; the with-past branch was traced for one token and has no causal mask, so it cannot be proven causal: export the decoder without merging (optimum --no-post-process / a single decoder_model.onnx)",
                n.op_type
            ),
        )
    })
}

fn count_attention(g: &GraphProto) -> usize {
    g.node
        .iter()
        .map(|n| {
            let here = usize::from(matches!(
                n.op_type.as_str(),
                "Softmax" | "Attention" | "GroupQueryAttention"
            ));
            here + n
                .attribute
                .iter()
                .flat_map(|a| a.g.as_ref().into_iter().chain(a.graphs.iter()))
                .map(count_attention)
                .sum::<usize>()
        })
        .sum()
}
