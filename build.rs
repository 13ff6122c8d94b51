//! Compiles `cuda/*.cu` with nvcc into a static library (fatbin for sm_80, sm_86, sm_89, sm_90a
//! plus compute_80 PTX, compressed), linked with the static CUDA runtime, when the `cuda` feature
//! is on. Off: nothing to do (a CPU-only build, chosen explicitly). On without nvcc: a build error
//! that says how to install it.

use std::path::{Path, PathBuf};
use std::process::Command;

const GENCODES: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_86,code=sm_86",
    "-gencode=arch=compute_89,code=sm_89",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=compute_80",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_PATH", "CUDA_HOME", "PATH", "NVCC_CCBIN"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    // ORT unloads a custom-op library with its last session; the CUDA runtime inside must stay.
    println!("cargo::rustc-cdylib-link-arg=-Wl,-z,nodelete");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let nvcc = find_nvcc(&root).unwrap_or_else(|| {
        panic!(
            "the `cuda` feature needs nvcc 13.0: run `bash scripts/install-nvcc.sh` and export the CUDA_PATH it prints \
             (or set NVCC), or build without the feature for a CPU-only library (--no-default-features)"
        )
    });
    let prefix = nvcc
        .parent()
        .and_then(Path::parent)
        .expect("nvcc lives in <prefix>/bin")
        .to_path_buf();
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !version.contains("release 13.0") {
        println!("cargo::warning=nvcc at {} is not CUDA 13.0; the GPU machine's driver (580) cannot load newer PTX", nvcc.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("cuda"))
        .expect("cuda/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    // cc reads $NVCC; setting .compiler() instead would pass gcc flags to nvcc raw.
    std::env::set_var("NVCC", &nvcc);
    let mut build = cc::Build::new();
    // debug(false): our release profile keeps host debug info, and with debug on cc passes nvcc -G,
    // which turns device optimisation off (the kernels ran ~100x slower).
    build
        .cuda(true)
        .cudart("static")
        .debug(false)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-Xfatbin=-compress-all")
        .include(root.join("cuda"));
    for g in GENCODES {
        build.flag(g);
    }
    for f in &files {
        build.file(f);
    }
    build.compile("power_retention_cuda");
    // The PyPI layout keeps libcudart_static.a in <prefix>/lib, where cc does not look.
    println!(
        "cargo::rustc-link-search=native={}",
        prefix.join("lib").display()
    );
    println!("cargo::rustc-cfg=has_cuda");
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let env_path = |var: &str| std::env::var_os(var).map(PathBuf::from);
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(env_path("NVCC"));
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        candidates.extend(env_path(var).map(|p| p.join("bin/nvcc")));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("nvcc")));
    }
    candidates.push(root.join(".cuda/nvidia/cu13/bin/nvcc"));
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
}
