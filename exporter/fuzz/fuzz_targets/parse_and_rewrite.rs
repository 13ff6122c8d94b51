//! Arbitrary bytes through parsing, matching and both rewrite targets: errors are fine, panics
//! are not. Run with `cargo +nightly fuzz run parse_and_rewrite -- -max_total_time=60` in
//! exporter/ (seed it with models/fixtures/*.onnx).
#![no_main]

use libfuzzer_sys::fuzz_target;
use power_retention_exporter::emit::{emit, Options, Target};
use power_retention_exporter::{analyse, onnx_io, report};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = onnx_io::parse(data) else { return };
    let Ok(analysis) = analyse(&model) else { return };
    let _ = report::render(&analysis);
    for target in [Target::PowerRetention, Target::SoftmaxReference] {
        let opts = Options { target, deg: 2, chunk_size: 64, cache_capacity: 4 };
        let _ = emit(&model, &analysis.blocks, &opts);
    }
});
