//! The plugin through real ONNX Runtime sessions (Rust `ort`, load-dynamic): kernels against the
//! f64 oracles on random shapes, prefill/step continuation, and every bad input's error.

mod common;
mod continuation;
mod errors;
mod prefill;
