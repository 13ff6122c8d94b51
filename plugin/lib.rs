//! Power retention as ONNX Runtime custom ops: `PowerRetention` (a whole sequence) and
//! `PowerRetentionStep` (one decode step over fixed-size buffers), domain `power_retention`.
//!
//! Load the built `libpower_retention_ort.so` with `SessionOptions.register_custom_ops_library`
//! (Python), `SessionBuilder::with_operator_library` (Rust `ort`) or `RegisterCustomOpsLibrary_V2`
//! (C). The op contract lives in [`schema`]; the f64 oracle in [`reference`].

pub use power_retention_schema as schema;

pub mod config;
pub mod cpu;
#[cfg(has_cuda)]
pub mod cuda;
pub mod element;
pub mod error;
pub mod ffi;
pub mod ops;
pub mod parallel;
pub mod reference;
pub mod shapes;
