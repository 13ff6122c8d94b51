//! The decoding harness behind `generate` and `bench`: rewritten models driven with their state in
//! place, and the original models driven with their KV cache, timed by the same code.

pub mod bench;
pub mod cli;
pub mod decoder;
// The only unsafe code of the exporter: raw CUDA driver copies to and from ORT's device tensors,
// behind a checked safe API (device, element type and count are verified before every copy).
#[allow(unsafe_code)]
pub mod device_copy;
pub mod generate;
pub mod runtime;
pub mod sampling;
pub mod stats;
pub mod stock;
pub mod tensor;
