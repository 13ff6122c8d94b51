//! The op table: the one definition of both ops (ports, shapes, dtypes, attributes, aliases).
//!
//! Registration with ONNX Runtime, shape inference, input validation, the exporter's emitted nodes
//! and the README's op reference are all derived from [`SCHEMAS`]. A new dtype is one entry in
//! [`MODEL_TYPES`]; a new port or attribute is one line here.

/// ONNX domain of both ops.
pub const DOMAIN: &str = "power_retention";
/// Opset version of [`DOMAIN`] that graphs must import.
pub const OPSET_VERSION: i64 = 1;

/// Tensor element types the ops see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    I64,
}

impl ElemType {
    /// The `TensorProto.DataType` code.
    pub const fn onnx_code(self) -> i32 {
        match self {
            ElemType::F32 => 1,
            ElemType::F16 => 10,
            ElemType::BF16 => 16,
            ElemType::I64 => 7,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<ElemType> {
        [ElemType::F32, ElemType::F16, ElemType::BF16, ElemType::I64]
            .into_iter()
            .find(|t| t.onnx_code() == code)
    }

    /// The name ONNX uses (`tensor(<name>)`).
    pub const fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float",
            ElemType::F16 => "float16",
            ElemType::BF16 => "bfloat16",
            ElemType::I64 => "int64",
        }
    }

    pub const fn size_bytes(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::F16 | ElemType::BF16 => 2,
            ElemType::I64 => 8,
        }
    }
}

/// The type constraint `T` of query/key/value/output/caches: one registration per entry.
pub const MODEL_TYPES: [ElemType; 3] = [ElemType::F32, ElemType::F16, ElemType::BF16];

/// What a port's element type is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortType {
    /// The model dtype `T` (one of [`MODEL_TYPES`], the same for every `T` port of a node).
    T,
    /// Always float32: gates, states and sums of keys accumulate over the whole context.
    F32,
    /// Always int64.
    I64,
}

impl PortType {
    pub const fn resolve(self, t: ElemType) -> ElemType {
        match self {
            PortType::T => t,
            PortType::F32 => ElemType::F32,
            PortType::I64 => ElemType::I64,
        }
    }

    pub const fn describe(self) -> &'static str {
        match self {
            PortType::T => "T",
            PortType::F32 => "float32",
            PortType::I64 => "int64",
        }
    }
}

/// Named dimensions. Every port's shape is a list of these; a symbol must take one value per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Batch.
    B,
    /// New tokens in this call.
    S,
    /// Query heads (a multiple of `Hkv`).
    Hq,
    /// Key/value heads.
    Hkv,
    /// Key (and query) head dim.
    Dk,
    /// Value head dim.
    Dv,
    /// Expanded state dim, `C(Dk + deg - 1, deg)`; derived, never bound from a shape alone.
    D,
    /// Decode cache capacity.
    C,
}

impl Dim {
    pub const ALL: [Dim; 8] = [
        Dim::B,
        Dim::S,
        Dim::Hq,
        Dim::Hkv,
        Dim::Dk,
        Dim::Dv,
        Dim::D,
        Dim::C,
    ];

    pub const fn symbol(self) -> &'static str {
        match self {
            Dim::B => "B",
            Dim::S => "S",
            Dim::Hq => "Hq",
            Dim::Hkv => "Hkv",
            Dim::Dk => "Dk",
            Dim::Dv => "Dv",
            Dim::D => "D",
            Dim::C => "C",
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// One input or output of an op.
#[derive(Debug)]
pub struct Port {
    pub name: &'static str,
    pub ty: PortType,
    pub shape: &'static [Dim],
    pub optional: bool,
    pub doc: &'static str,
}

/// An attribute with its default.
#[derive(Debug)]
pub struct Attribute {
    pub name: &'static str,
    pub default: AttrValue,
    pub doc: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Float(f32),
}

/// One op: everything ORT, the validator, the exporter and the docs need to know.
#[derive(Debug)]
pub struct OpSchema {
    pub name: &'static str,
    pub doc: &'static str,
    pub inputs: &'static [Port],
    pub outputs: &'static [Port],
    pub attributes: &'static [Attribute],
    /// `(input, output)` pairs whose buffers may be the same memory (in-place decode loops).
    pub aliases: &'static [(usize, usize)],
    /// Pairs of optional inputs that must be given together or not at all.
    pub together: &'static [(usize, usize)],
    /// `(output, input)`: the optional output can only be produced when the optional input is given.
    pub output_needs: &'static [(usize, usize)],
}

impl OpSchema {
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|p| p.name == name)
    }

    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|p| p.name == name)
    }

    pub fn attribute(&self, name: &str) -> Option<&'static Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// `(B, S, Hq, Dk)`-style rendering of a port's shape.
    pub fn shape_text(shape: &[Dim]) -> String {
        let syms: Vec<&str> = shape.iter().map(|d| d.symbol()).collect();
        format!("({})", syms.join(", "))
    }
}

use Dim::*;

const QKV_DOC_Q: &str = "queries of the new tokens";

const DEG: Attribute = Attribute {
    name: "deg",
    default: AttrValue::Int(2),
    doc: "power p of the attention weights (q·k)^p; even. States exist for deg 2 only",
};
const SCALE: Attribute = Attribute {
    name: "scale",
    default: AttrValue::Float(0.0),
    doc: "multiplies q·k before the power; 0 (or absent) means 1/sqrt(Dk); must be finite",
};
const CHUNK_SIZE: Attribute = Attribute {
    name: "chunk_size",
    default: AttrValue::Int(64),
    doc: "tokens per chunk of the chunked algorithm; any value ≥ 1 gives the same outputs within tolerance",
};

/// Port indices of `PowerRetention`.
pub mod prefill {
    pub const QUERY: usize = 0;
    pub const KEY: usize = 1;
    pub const VALUE: usize = 2;
    pub const LOG_GATE: usize = 3;
    pub const PAST_STATE: usize = 4;
    pub const PAST_SUM_OF_KEYS: usize = 5;

    pub const OUTPUT: usize = 0;
    pub const PRESENT_STATE: usize = 1;
    pub const PRESENT_SUM_OF_KEYS: usize = 2;
}

/// Port indices of `PowerRetentionStep`.
pub mod decode {
    pub const QUERY: usize = 0;
    pub const KEY: usize = 1;
    pub const VALUE: usize = 2;
    pub const LOG_GATE: usize = 3;
    pub const PAST_STATE: usize = 4;
    pub const PAST_SUM_OF_KEYS: usize = 5;
    pub const PAST_KEY_CACHE: usize = 6;
    pub const PAST_VALUE_CACHE: usize = 7;
    pub const PAST_LOG_GATE_CACHE: usize = 8;
    pub const CACHE_LENGTH: usize = 9;

    pub const OUTPUT: usize = 0;
    pub const PRESENT_STATE: usize = 1;
    pub const PRESENT_SUM_OF_KEYS: usize = 2;
    pub const PRESENT_KEY_CACHE: usize = 3;
    pub const PRESENT_VALUE_CACHE: usize = 4;
    pub const PRESENT_LOG_GATE_CACHE: usize = 5;
    pub const PRESENT_CACHE_LENGTH: usize = 6;
}

/// `PowerRetention`: a whole sequence (prefill), optionally continuing from a state.
pub static POWER_RETENTION: OpSchema = OpSchema {
    name: "PowerRetention",
    doc: "Causal power retention over S tokens: y_i = Σ_j w_ij v_j / Σ_j w_ij with \
          w_ij = (scale·q_i·k_j)^deg · exp(G_i − G_j), G the cumulative log gate; \
          continues from (past_state, past_sum_of_keys) when given.",
    inputs: &[
        Port {
            name: "query",
            ty: PortType::T,
            shape: &[B, S, Hq, Dk],
            optional: false,
            doc: QKV_DOC_Q,
        },
        Port {
            name: "key",
            ty: PortType::T,
            shape: &[B, S, Hkv, Dk],
            optional: false,
            doc: "keys",
        },
        Port {
            name: "value",
            ty: PortType::T,
            shape: &[B, S, Hkv, Dv],
            optional: false,
            doc: "values",
        },
        Port {
            name: "log_gate",
            ty: PortType::F32,
            shape: &[B, S, Hkv],
            optional: true,
            doc: "per-token log decay (≤ 0); absent = no gating",
        },
        Port {
            name: "past_state",
            ty: PortType::F32,
            shape: &[B, Hkv, D, Dv],
            optional: true,
            doc: "state to continue from (chunked prefill); compact layout",
        },
        Port {
            name: "past_sum_of_keys",
            ty: PortType::F32,
            shape: &[B, Hkv, D],
            optional: true,
            doc: "sum of expanded keys to continue from; required iff past_state is given",
        },
    ],
    outputs: &[
        Port {
            name: "output",
            ty: PortType::T,
            shape: &[B, S, Hq, Dv],
            optional: false,
            doc: "normalised retention output",
        },
        Port {
            name: "present_state",
            ty: PortType::F32,
            shape: &[B, Hkv, D, Dv],
            optional: true,
            doc: "state with every token of this call folded in",
        },
        Port {
            name: "present_sum_of_keys",
            ty: PortType::F32,
            shape: &[B, Hkv, D],
            optional: true,
            doc: "sum of expanded keys with every token of this call folded in",
        },
    ],
    attributes: &[DEG, SCALE, CHUNK_SIZE],
    aliases: &[],
    together: &[(prefill::PAST_STATE, prefill::PAST_SUM_OF_KEYS)],
    output_needs: &[],
};

/// `PowerRetentionStep`: decoding over fixed-size buffers (state + a small window cache).
pub static POWER_RETENTION_STEP: OpSchema = OpSchema {
    name: "PowerRetentionStep",
    doc:
        "One decode step: S new tokens (1 ≤ S ≤ C) attend to the state, the cached window and \
          themselves; the window is appended to, or folded into the state when it reaches C tokens.",
    inputs: &[
        Port {
            name: "query",
            ty: PortType::T,
            shape: &[B, S, Hq, Dk],
            optional: false,
            doc: QKV_DOC_Q,
        },
        Port {
            name: "key",
            ty: PortType::T,
            shape: &[B, S, Hkv, Dk],
            optional: false,
            doc: "keys of the new tokens",
        },
        Port {
            name: "value",
            ty: PortType::T,
            shape: &[B, S, Hkv, Dv],
            optional: false,
            doc: "values of the new tokens",
        },
        Port {
            name: "log_gate",
            ty: PortType::F32,
            shape: &[B, S, Hkv],
            optional: true,
            doc: "per-token log decay of the new tokens (≤ 0); absent = no gating",
        },
        Port {
            name: "past_state",
            ty: PortType::F32,
            shape: &[B, Hkv, D, Dv],
            optional: false,
            doc: "state; compact layout",
        },
        Port {
            name: "past_sum_of_keys",
            ty: PortType::F32,
            shape: &[B, Hkv, D],
            optional: false,
            doc: "sum of expanded keys",
        },
        Port {
            name: "past_key_cache",
            ty: PortType::T,
            shape: &[B, C, Hkv, Dk],
            optional: false,
            doc: "not-yet-folded recent keys; C is read from this shape",
        },
        Port {
            name: "past_value_cache",
            ty: PortType::T,
            shape: &[B, C, Hkv, Dv],
            optional: false,
            doc: "not-yet-folded recent values",
        },
        Port {
            name: "past_log_gate_cache",
            ty: PortType::F32,
            shape: &[B, C, Hkv],
            optional: true,
            doc: "raw log gates of the cached tokens; required iff log_gate is given",
        },
        Port {
            name: "cache_length",
            ty: PortType::I64,
            shape: &[B],
            optional: false,
            doc: "valid cache entries per sequence, in [0, C]",
        },
    ],
    outputs: &[
        Port {
            name: "output",
            ty: PortType::T,
            shape: &[B, S, Hq, Dv],
            optional: false,
            doc: "retention output of the new tokens",
        },
        Port {
            name: "present_state",
            ty: PortType::F32,
            shape: &[B, Hkv, D, Dv],
            optional: false,
            doc: "state after this step",
        },
        Port {
            name: "present_sum_of_keys",
            ty: PortType::F32,
            shape: &[B, Hkv, D],
            optional: false,
            doc: "sum of keys after this step",
        },
        Port {
            name: "present_key_cache",
            ty: PortType::T,
            shape: &[B, C, Hkv, Dk],
            optional: false,
            doc: "key window after this step",
        },
        Port {
            name: "present_value_cache",
            ty: PortType::T,
            shape: &[B, C, Hkv, Dv],
            optional: false,
            doc: "value window after this step",
        },
        Port {
            name: "present_log_gate_cache",
            ty: PortType::F32,
            shape: &[B, C, Hkv],
            optional: true,
            doc: "log-gate window after this step (gated models)",
        },
        Port {
            name: "present_cache_length",
            ty: PortType::I64,
            shape: &[B],
            optional: false,
            doc: "valid window entries after this step",
        },
    ],
    attributes: &[DEG, SCALE],
    aliases: &[
        (decode::PAST_STATE, decode::PRESENT_STATE),
        (decode::PAST_SUM_OF_KEYS, decode::PRESENT_SUM_OF_KEYS),
        (decode::PAST_KEY_CACHE, decode::PRESENT_KEY_CACHE),
        (decode::PAST_VALUE_CACHE, decode::PRESENT_VALUE_CACHE),
        (decode::PAST_LOG_GATE_CACHE, decode::PRESENT_LOG_GATE_CACHE),
        (decode::CACHE_LENGTH, decode::PRESENT_CACHE_LENGTH),
    ],
    together: &[(decode::LOG_GATE, decode::PAST_LOG_GATE_CACHE)],
    output_needs: &[(decode::PRESENT_LOG_GATE_CACHE, decode::LOG_GATE)],
};

/// Every op of the domain.
pub static SCHEMAS: [&OpSchema; 2] = [&POWER_RETENTION, &POWER_RETENTION_STEP];

/// Expanded state dim for a key head dim and degree: `C(dk + deg − 1, deg)`.
/// `None` on overflow.
pub fn expanded_dim(dk: usize, deg: usize) -> Option<usize> {
    let mut acc: u128 = 1;
    for i in 0..deg as u128 {
        acc = acc.checked_mul(dk as u128 + i)? / (i + 1);
    }
    usize::try_from(acc).ok()
}

/// The README's op reference, rendered from the table (a test keeps README.md in sync:
/// `cargo run -p power-retention-schema --example op_reference` prints it).
pub fn markdown_reference() -> String {
    let types: Vec<&str> = MODEL_TYPES.iter().map(|t| t.name()).collect();
    let mut s = format!(
        "Domain `{DOMAIN}`, opset version {OPSET_VERSION}. `T` ∈ {{{}}} (one registration per type, CPU and CUDA). \
         Layout of every per-token tensor: `(batch, seq, heads, head_dim)`. \
         State layout (deg 2): `D = Dk(Dk+1)/2` rows in upper-triangle row-major order, \
         row(a, b) = a(2Dk − a + 1)/2 + (b − a) for a ≤ b, feature x_a·x_b, key-side weight 2 when a < b.\n",
        types.join(", ")
    );
    for op in SCHEMAS {
        s += &format!("\n### `{}`\n\n{}\n\n", op.name, op.doc);
        for (title, ports) in [("input", op.inputs), ("output", op.outputs)] {
            s += &format!("| {title} | shape | type | notes |\n|---|---|---|---|\n");
            for p in ports {
                let opt = if p.optional { " (optional)" } else { "" };
                s += &format!(
                    "| `{}`{opt} | {} | {} | {} |\n",
                    p.name,
                    OpSchema::shape_text(p.shape),
                    p.ty.describe(),
                    p.doc
                );
            }
            s += "\n";
        }
        s += "| attribute | default | notes |\n|---|---|---|\n";
        for a in op.attributes {
            let d = match a.default {
                AttrValue::Int(v) => v.to_string(),
                AttrValue::Float(v) => v.to_string(),
            };
            s += &format!("| `{}` | {d} | {} |\n", a.name, a.doc);
        }
        if !op.aliases.is_empty() {
            let pairs: Vec<String> = op
                .aliases
                .iter()
                .map(|&(i, o)| format!("`{}` → `{}`", op.inputs[i].name, op.outputs[o].name))
                .collect();
            s += &format!(
                "\nIn-place pairs (may be bound to the same buffer): {}.\n",
                pairs.join(", ")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_index_constants_name_the_right_ports() {
        let p = &POWER_RETENTION;
        assert_eq!(p.input_index("query"), Some(prefill::QUERY));
        assert_eq!(p.input_index("log_gate"), Some(prefill::LOG_GATE));
        assert_eq!(p.input_index("past_state"), Some(prefill::PAST_STATE));
        assert_eq!(
            p.input_index("past_sum_of_keys"),
            Some(prefill::PAST_SUM_OF_KEYS)
        );
        assert_eq!(
            p.output_index("present_state"),
            Some(prefill::PRESENT_STATE)
        );
        assert_eq!(
            p.output_index("present_sum_of_keys"),
            Some(prefill::PRESENT_SUM_OF_KEYS)
        );
        let s = &POWER_RETENTION_STEP;
        assert_eq!(
            s.input_index("past_key_cache"),
            Some(decode::PAST_KEY_CACHE)
        );
        assert_eq!(
            s.input_index("past_log_gate_cache"),
            Some(decode::PAST_LOG_GATE_CACHE)
        );
        assert_eq!(s.input_index("cache_length"), Some(decode::CACHE_LENGTH));
        assert_eq!(
            s.output_index("present_log_gate_cache"),
            Some(decode::PRESENT_LOG_GATE_CACHE)
        );
        assert_eq!(
            s.output_index("present_cache_length"),
            Some(decode::PRESENT_CACHE_LENGTH)
        );
    }

    #[test]
    fn aliased_ports_have_identical_types_and_shapes() {
        for op in SCHEMAS {
            for &(i, o) in op.aliases {
                assert_eq!(op.inputs[i].ty, op.outputs[o].ty, "{}", op.name);
                assert_eq!(op.inputs[i].shape, op.outputs[o].shape, "{}", op.name);
            }
        }
    }

    #[test]
    fn expanded_dim_matches_the_binomial() {
        assert_eq!(expanded_dim(64, 2), Some(2080));
        assert_eq!(expanded_dim(128, 2), Some(8256));
        assert_eq!(expanded_dim(64, 4), Some(766_480));
        assert_eq!(expanded_dim(128, 4), Some(11_716_640));
        assert_eq!(expanded_dim(1, 2), Some(1));
    }
}

#[cfg(test)]
mod readme {
    #[test]
    fn readme_op_reference_is_generated_from_the_table() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md");
        let begin = readme
            .find("<!-- op-reference:begin")
            .expect("begin marker");
        let start = readme[begin..].find("-->").expect("end of begin marker") + begin + 3;
        let end = readme
            .find("<!-- op-reference:end -->")
            .expect("end marker");
        assert_eq!(
            readme[start..end].trim(),
            super::markdown_reference().trim(),
            "README op reference is stale: cargo run -p power-retention-schema --example op_reference"
        );
    }
}
