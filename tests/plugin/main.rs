//! The plugin through real ONNX Runtime sessions (Rust `ort`, load-dynamic): kernels against the
//! f64 oracles on random shapes, prefill/step continuation, and every bad input's error.

// Tests index several per-sequence arrays in step; range loops read clearer there.
#![allow(clippy::needless_range_loop)]

mod c_api;
mod common;
mod continuation;
mod errors;
mod prefill;
