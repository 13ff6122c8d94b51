//! Read-only index over one ONNX graph: producers, consumers, constants and attributes.

use std::collections::{HashMap, HashSet};

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, AttributeProto, GraphProto,
    NodeProto, TensorProto,
};

/// ONNX `TensorProto.DataType` codes the matcher reads.
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const BFLOAT16: i32 = 16;
}

/// Constants bigger than this are never decoded: the matcher only needs masks, scales and shapes.
const MAX_CONST_ELEMS: usize = 1 << 24;

pub struct Graph<'a> {
    pub proto: &'a GraphProto,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    initializers: HashMap<&'a str, &'a TensorProto>,
    inputs: HashSet<&'a str>,
    outputs: HashSet<&'a str>,
}

impl<'a> Graph<'a> {
    pub fn new(proto: &'a GraphProto) -> Graph<'a> {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in proto.node.iter().enumerate() {
            for o in &n.output {
                if !o.is_empty() {
                    producer.insert(o.as_str(), i);
                }
            }
            for inp in &n.input {
                if !inp.is_empty() {
                    let c = consumers.entry(inp.as_str()).or_default();
                    if c.last() != Some(&i) {
                        c.push(i);
                    }
                }
            }
        }
        Graph {
            proto,
            producer,
            consumers,
            initializers: proto
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            inputs: proto.input.iter().map(|v| v.name.as_str()).collect(),
            outputs: proto.output.iter().map(|v| v.name.as_str()).collect(),
        }
    }

    pub fn producer(&self, tensor: &str) -> Option<&'a NodeProto> {
        self.producer.get(tensor).map(|&i| &self.proto.node[i])
    }

    /// The producer when it has type `op` (in the default domain).
    pub fn producer_op(&self, tensor: &str, op: &str) -> Option<&'a NodeProto> {
        self.producer(tensor)
            .filter(|n| n.op_type == op && is_default_domain(&n.domain))
    }

    pub fn consumers(&self, tensor: &str) -> Vec<&'a NodeProto> {
        self.consumers
            .get(tensor)
            .map(|v| v.iter().map(|&i| &self.proto.node[i]).collect())
            .unwrap_or_default()
    }

    pub fn is_graph_input(&self, tensor: &str) -> bool {
        self.inputs.contains(tensor) && !self.initializers.contains_key(tensor)
    }

    /// The element type the graph declares for a tensor (value_info, inputs, outputs), or the
    /// one its producer makes evident (comparisons and logic ops, `Cast`).
    pub fn elem_type(&self, tensor: &str) -> Option<i32> {
        let declared = self
            .proto
            .value_info
            .iter()
            .chain(&self.proto.input)
            .chain(&self.proto.output)
            .find(|v| v.name == tensor)
            .and_then(|v| v.type_.as_ref())
            .and_then(|t| match &t.value {
                Some(onnx_protobuf::type_proto::Value::TensorType(tt)) => Some(tt.elem_type),
                _ => None,
            })
            .filter(|&t| t != 0);
        if declared.is_some() {
            return declared;
        }
        if let Some(c) = self.constant(tensor) {
            return Some(c.data_type);
        }
        let n = self.producer(tensor)?;
        match n.op_type.as_str() {
            "And" | "Or" | "Xor" | "Not" | "Equal" | "Less" | "LessOrEqual" | "Greater"
            | "GreaterOrEqual" | "IsNaN" | "IsInf" => Some(dtype::BOOL),
            "Cast" => attr_i(n, "to").and_then(|t| i32::try_from(t).ok()),
            "Expand" | "Reshape" | "Unsqueeze" | "Squeeze" | "Identity" | "Slice" | "Transpose"
            | "Tile" => self.elem_type(input(n, 0)),
            "Where" => self.elem_type(input(n, 1)),
            _ => None,
        }
    }

    pub fn is_graph_output(&self, tensor: &str) -> bool {
        self.outputs.contains(tensor)
    }

    pub fn initializer(&self, tensor: &str) -> Option<&'a TensorProto> {
        self.initializers.get(tensor).copied()
    }

    /// A constant tensor: an initializer (not overridable by an input) or a `Constant` node's value.
    pub fn constant(&self, tensor: &str) -> Option<&'a TensorProto> {
        if let Some(t) = self.initializers.get(tensor) {
            return (!self.inputs.contains(tensor)).then_some(*t);
        }
        let n = self.producer_op(tensor, "Constant")?;
        n.attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
    }

    /// The values of a small constant, as f64 (integers and booleans included).
    pub fn constant_values(&self, tensor: &str) -> Option<Vec<f64>> {
        if let Some(n) = self.producer_op(tensor, "Constant") {
            for a in &n.attribute {
                match a.name.as_str() {
                    "value_float" => return Some(vec![a.f as f64]),
                    "value_int" => return Some(vec![a.i as f64]),
                    "value_floats" => return Some(a.floats.iter().map(|&v| v as f64).collect()),
                    "value_ints" => return Some(a.ints.iter().map(|&v| v as f64).collect()),
                    _ => {}
                }
            }
        }
        tensor_values(self.constant(tensor)?)
    }

    /// A constant holding exactly one value (any rank).
    pub fn scalar(&self, tensor: &str) -> Option<f64> {
        match self.constant_values(tensor)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// The tensor after skipping value-preserving `Identity`/`Cast`/`Dropout` producers.
    pub fn skip_passthrough<'s>(&self, mut tensor: &'s str) -> &'s str
    where
        'a: 's,
    {
        for _ in 0..16 {
            match self.producer(tensor) {
                Some(n)
                    if is_default_domain(&n.domain)
                        && matches!(n.op_type.as_str(), "Identity" | "Cast" | "Dropout")
                        && !n.input.is_empty() =>
                {
                    tensor = n.input[0].as_str();
                }
                _ => break,
            }
        }
        tensor
    }
}

/// Input `i` of a node; "" (no tensor) when the node has fewer inputs.
pub fn input(n: &NodeProto, i: usize) -> &str {
    n.input.get(i).map_or("", |s| s.as_str())
}

/// Output `i` of a node; "" when the node has fewer outputs.
pub fn output(n: &NodeProto, i: usize) -> &str {
    n.output.get(i).map_or("", |s| s.as_str())
}

pub fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

pub fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

pub fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name)
        .filter(|a| a.type_.enum_value() == Ok(AttributeType::INT))
        .map(|a| a.i)
}

pub fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    attr(n, name)
        .filter(|a| a.type_.enum_value() == Ok(AttributeType::FLOAT))
        .map(|a| a.f)
}

pub fn attr_ints<'n>(n: &'n NodeProto, name: &str) -> Option<&'n [i64]> {
    attr(n, name)
        .filter(|a| a.type_.enum_value() == Ok(AttributeType::INTS))
        .map(|a| a.ints.as_slice())
}

pub fn is_external(t: &TensorProto) -> bool {
    t.data_location.enum_value() == Ok(DataLocation::EXTERNAL)
}

/// Number of elements, `None` on overflow or negative dims.
pub fn elem_count(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

/// Decodes a small in-file tensor; `None` for external data, unknown dtypes, size mismatches.
pub fn tensor_values(t: &TensorProto) -> Option<Vec<f64>> {
    if is_external(t) {
        return None;
    }
    let n = elem_count(&t.dims)?;
    if n > MAX_CONST_ELEMS {
        return None;
    }
    let raw = &t.raw_data;
    let from_raw = |width: usize, f: &dyn Fn(&[u8]) -> f64| -> Option<Vec<f64>> {
        (raw.len() == n * width).then(|| raw.chunks_exact(width).map(f).collect())
    };
    let v: Vec<f64> = if !raw.is_empty() {
        match t.data_type {
            dtype::FLOAT => from_raw(4, &|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)?,
            dtype::DOUBLE => from_raw(8, &|b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            })?,
            dtype::INT64 => from_raw(8, &|b| {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
            })?,
            dtype::INT32 => from_raw(4, &|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)?,
            dtype::BOOL | dtype::UINT8 => from_raw(1, &|b| b[0] as f64)?,
            dtype::INT8 => from_raw(1, &|b| b[0] as i8 as f64)?,
            dtype::FLOAT16 => from_raw(2, &|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())?,
            dtype::BFLOAT16 => from_raw(2, &|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())?,
            _ => return None,
        }
    } else {
        match t.data_type {
            dtype::FLOAT => t.float_data.iter().map(|&v| v as f64).collect(),
            dtype::DOUBLE => t.double_data.clone(),
            dtype::INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
            dtype::INT32 | dtype::BOOL | dtype::UINT8 | dtype::INT8 => {
                t.int32_data.iter().map(|&v| v as f64).collect()
            }
            dtype::FLOAT16 => t
                .int32_data
                .iter()
                .map(|&v| half::f16::from_bits(v as u16).to_f64())
                .collect(),
            dtype::BFLOAT16 => t
                .int32_data
                .iter()
                .map(|&v| half::bf16::from_bits(v as u16).to_f64())
                .collect(),
            _ => return None,
        }
    };
    (v.len() == n).then_some(v)
}
