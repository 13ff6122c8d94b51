//! Shared test plumbing: finding the built plugin and ONNX Runtime, one-node models built from
//! the op table, tensors in every dtype, and error measures.

use std::path::PathBuf;
use std::sync::OnceLock;

use half::{bf16, f16};
use onnx_protobuf::{
    attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, Message, ModelProto,
    NodeProto, OperatorSetIdProto, TypeProto, ValueInfoProto,
};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use power_retention_ort::schema::{ElemType, OpSchema, DOMAIN, OPSET_VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The plugin built by this `cargo test` run (cdylibs are built before integration tests), or
/// `POWER_RETENTION_LIB`.
pub fn plugin_path() -> PathBuf {
    if let Ok(p) = std::env::var("POWER_RETENTION_LIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // `cargo test` leaves the fresh cdylib beside the test binary (target/<profile>/deps).
    let deps = exe.parent().expect("target/<profile>/deps");
    let lib = [
        deps.join("libpower_retention_ort.so"),
        deps.join("../libpower_retention_ort.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| deps.join("libpower_retention_ort.so"));
    assert!(
        lib.exists(),
        "plugin library not found at {} (build it with cargo build, or set POWER_RETENTION_LIB)",
        lib.display()
    );
    lib
}

/// ONNX Runtime's shared library: `ORT_DYLIB_PATH`, else the one in the repo's `.venv` wheel.
pub fn ort_path() -> PathBuf {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let capi = root.join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
    let found = std::fs::read_dir(&capi).ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
        })
    });
    found.unwrap_or_else(|| panic!("ONNX Runtime not found: set ORT_DYLIB_PATH, or run scripts/setup.sh to install the onnxruntime wheel into .venv ({})", capi.display()))
}

/// ONNX Runtime's environment, created once per test process.
pub fn env() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        ort::init_from(ort_path())
            .expect("load ONNX Runtime")
            .with_name("power-retention-tests")
            .build()
            .expect("ORT environment")
    })
}

/// Held while creating a session (see [`session`]).
pub fn creation_lock() -> std::sync::MutexGuard<'static, ()> {
    static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CREATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A CPU session of `model` with the plugin registered.
///
/// Session creation is serialised: ORT adds a custom domain to ONNX's process-global
/// domain-version map with a check-then-insert that races when two sessions register the same
/// custom-op domain at once ("domain is already exist").
pub fn session(model: &[u8]) -> ort::Result<Session> {
    let _one_at_a_time = creation_lock();
    Session::builder(env())?
        .with_intra_threads(2)?
        .with_operator_library(plugin_path())?
        .commit_from_memory(model)
}

/// An attribute value for [`one_node_model`].
#[derive(Clone, Copy, Debug)]
pub enum Attr {
    Int(i64),
    Float(f32),
}

/// A one-node model of `op`. Inputs/outputs are named after their ports; `inputs[i] = None`
/// leaves port i unwired (""), `Some(t)` wires it with element type `t` and unknown shape.
pub fn one_node_model(
    op: &OpSchema,
    inputs: &[Option<ElemType>],
    outputs: &[Option<ElemType>],
    attrs: &[(&str, Attr)],
) -> Vec<u8> {
    let value_info = |name: &str, t: ElemType| {
        let mut tt = type_proto::Tensor::new();
        tt.elem_type = t.onnx_code();
        let mut ty = TypeProto::new();
        ty.value = Some(type_proto::Value::TensorType(tt));
        let mut vi = ValueInfoProto::new();
        vi.name = name.to_string();
        vi.type_ = Some(ty).into();
        vi
    };
    let mut node = NodeProto::new();
    node.op_type = op.name.into();
    node.domain = DOMAIN.into();
    node.name = "node0".into();
    let last_in = inputs
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |i| i + 1);
    node.input = (0..last_in)
        .map(|i| {
            if inputs[i].is_some() {
                op.inputs[i].name.to_string()
            } else {
                String::new()
            }
        })
        .collect();
    let last_out = outputs
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |i| i + 1);
    node.output = (0..last_out)
        .map(|i| {
            if outputs[i].is_some() {
                op.outputs[i].name.to_string()
            } else {
                String::new()
            }
        })
        .collect();
    for (name, v) in attrs {
        let mut a = AttributeProto::new();
        a.name = name.to_string();
        match v {
            Attr::Int(i) => {
                a.i = *i;
                a.type_ = AttributeType::INT.into();
            }
            Attr::Float(f) => {
                a.f = *f;
                a.type_ = AttributeType::FLOAT.into();
            }
        }
        node.attribute.push(a);
    }
    let mut graph = GraphProto::new();
    graph.name = "g".into();
    graph.node.push(node);
    for (i, t) in inputs.iter().enumerate() {
        if let Some(t) = t {
            graph.input.push(value_info(op.inputs[i].name, *t));
        }
    }
    for (i, t) in outputs.iter().enumerate() {
        if let Some(t) = t {
            graph.output.push(value_info(op.outputs[i].name, *t));
        }
    }
    let mut model = ModelProto::new();
    model.ir_version = 10;
    model.graph = Some(graph).into();
    for (domain, version) in [("", 17), (DOMAIN, OPSET_VERSION)] {
        let mut o = OperatorSetIdProto::new();
        o.domain = domain.into();
        o.version = version;
        model.opset_import.push(o);
    }
    model.write_to_bytes().expect("serialise model")
}

/// Every port wired with its table type for model dtype `t`.
pub fn all_ports(
    ports: &[power_retention_ort::schema::Port],
    t: ElemType,
) -> Vec<Option<ElemType>> {
    ports.iter().map(|p| Some(p.ty.resolve(t))).collect()
}

/// Host data of one tensor, kept in f64 for the oracles and converted to the port's dtype.
#[derive(Clone, Debug)]
pub struct Data {
    pub dims: Vec<i64>,
    pub values: Vec<f64>,
}

impl Data {
    pub fn new(dims: &[usize], values: Vec<f64>) -> Data {
        assert_eq!(dims.iter().product::<usize>(), values.len());
        Data {
            dims: dims.iter().map(|&d| d as i64).collect(),
            values,
        }
    }

    /// The values as the dtype rounds them (what the kernel sees), back in f64.
    pub fn rounded(&self, t: ElemType) -> Vec<f64> {
        self.values.iter().map(|&x| round_to(x, t)).collect()
    }

    pub fn tensor(&self, t: ElemType) -> DynValue {
        let dims = self.dims.clone();
        match t {
            ElemType::F32 => Tensor::from_array((
                dims,
                self.values.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            ))
            .unwrap()
            .into_dyn(),
            ElemType::F16 => Tensor::from_array((
                dims,
                self.values
                    .iter()
                    .map(|&x| f16::from_f64(x))
                    .collect::<Vec<_>>(),
            ))
            .unwrap()
            .into_dyn(),
            ElemType::BF16 => Tensor::from_array((
                dims,
                self.values
                    .iter()
                    .map(|&x| bf16::from_f64(x))
                    .collect::<Vec<_>>(),
            ))
            .unwrap()
            .into_dyn(),
            ElemType::I64 => Tensor::from_array((
                dims,
                self.values.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ))
            .unwrap()
            .into_dyn(),
        }
    }
}

pub fn round_to(x: f64, t: ElemType) -> f64 {
    match t {
        ElemType::F32 => x as f32 as f64,
        ElemType::F16 => f16::from_f64(x).to_f64(),
        ElemType::BF16 => bf16::from_f64(x).to_f64(),
        ElemType::I64 => x.round(),
    }
}

/// Any output tensor as f64 values.
pub fn values_of(v: &DynValue) -> Vec<f64> {
    if let Ok((_, x)) = v.try_extract_tensor::<f32>() {
        return x.iter().map(|&x| x as f64).collect();
    }
    if let Ok((_, x)) = v.try_extract_tensor::<f16>() {
        return x.iter().map(|&x| x.to_f64()).collect();
    }
    if let Ok((_, x)) = v.try_extract_tensor::<bf16>() {
        return x.iter().map(|&x| x.to_f64()).collect();
    }
    if let Ok((_, x)) = v.try_extract_tensor::<i64>() {
        return x.iter().map(|&x| x as f64).collect();
    }
    panic!("unexpected output type {:?}", v.dtype())
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard normal values scaled by `scale` (Box–Muller; the tests need no other distribution).
pub fn normal(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random();
            scale * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// log σ(x) gates with x ~ N(mean, 1): mean 4 decays mildly, 0 strongly.
pub fn log_gates(rng: &mut StdRng, n: usize, mean: f64) -> Vec<f64> {
    normal(rng, n, 1.0)
        .into_iter()
        .map(|x| -(1.0 + (-(x + mean)).exp()).ln())
        .collect()
}

/// ‖a − b‖ / ‖b‖; NaN anywhere gives infinity so it never passes.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Tolerances on ‖err‖/‖ref‖ against the f64 oracle on the same rounded inputs. The kernels
/// compute in f32, so the error is f32 arithmetic (~1e-6) plus rounding the output to `T`:
/// at most 2^-11 (f16) or 2^-8 (bf16) relative per element. Each bound is ~2× that.
pub fn tolerance(t: ElemType) -> f64 {
    match t {
        ElemType::F32 => 2e-5,
        ElemType::F16 => 1e-3,
        ElemType::BF16 => 8e-3,
        ElemType::I64 => 0.0,
    }
}
