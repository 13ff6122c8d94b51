//! Every written model passes `onnx.checker.check_model(full_check=True)` (the repo's `.venv`
//! Python, or `PYTHON`).

mod common;

use std::process::Command;

use common::{repo_root, rewritable, rewrite, scratch};

#[test]
fn written_models_pass_the_full_onnx_checker() {
    let python = std::env::var("PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "Python with the onnx package not found at {} (set PYTHON)",
        python.display()
    );
    let mut paths = Vec::new();
    for f in rewritable() {
        for target in ["power-retention", "softmax-reference"] {
            let dir = scratch("checker", &format!("{}_{target}", f.name));
            rewrite(&f, &dir, &["--target", target]);
            paths.push(dir.join("prefill.onnx"));
            paths.push(dir.join("decode.onnx"));
        }
    }
    let script = "import sys, onnx\nfor p in sys.argv[1:]:\n    onnx.checker.check_model(onnx.load(p), full_check=True)\n";
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(&paths)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "onnx.checker failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
