//! The only unsafe code of the plugin: ONNX Runtime's C API (registration, kernel callbacks,
//! tensor access, thread pool, shape inference) and the pointer-based sgemm, each wrapped once
//! in safe types. Every callback from ORT goes through [`register::guard`].
#![allow(unsafe_code)]

pub mod api;
pub mod context;
#[cfg(has_cuda)]
pub mod cuda;
pub mod gemm;
pub mod kernel_info;
pub mod register;
pub mod shape_infer;
