//! The decoding harness behind `generate` and `bench`: rewritten models driven with their state in
//! place, and the original models driven with their KV cache, timed by the same code.

pub mod bench;
pub mod cli;
pub mod decoder;
pub mod generate;
pub mod runtime;
pub mod sampling;
pub mod stats;
pub mod stock;
pub mod tensor;
