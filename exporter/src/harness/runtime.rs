//! ONNX Runtime for the harness: loaded dynamically (the `libonnxruntime.so` inside the
//! `onnxruntime` wheel, or ORT_DYLIB_PATH), with the plugin registered on every session.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ort::environment::Environment;
use ort::session::Session;

/// Where the models run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// ORT's CUDA execution provider; `graph` captures the decode step in a CUDA graph.
    Cuda {
        graph: bool,
    },
}

impl Device {
    pub fn cuda_graph(self) -> bool {
        matches!(self, Device::Cuda { graph: true })
    }

    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda { graph: false } => "cuda",
            Device::Cuda { graph: true } => "cuda+graph",
        }
    }
}

/// Which attention kernels ONNX Runtime's CUDA EP may pick for the fused attention ops
/// (MultiHeadAttention, GroupQueryAttention, Attention) of stock models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StockAttention {
    /// Every backend but cuDNN's flash attention. ORT 1.31 on an H100 picks cuDNN for these ops
    /// and pays ≈60 ms at every new KV length, i.e. at every decode step: 55–70 ms per step
    /// against 1.4–1.6 ms without it (benches/RESULTS.md, 2026-12-07). Timing that would time
    /// cuDNN's set-up, not attention.
    #[default]
    NoCudnn,
    /// ONNX Runtime's own choice (its defaults, and its ORT_* environment switches).
    OrtDefault,
}

/// ORT's switch for cuDNN flash attention, read by its CUDA EP.
const CUDNN_SWITCH: &str = "ORT_ENABLE_CUDNN_FLASH_ATTENTION";

impl StockAttention {
    /// Applies the choice. Must run before ONNX Runtime is loaded (while the process has one
    /// thread): ORT's CUDA EP reads the switch from the environment, which is the setting measured
    /// in RESULTS.md. The CUDA EP's `sdpa_kernel` bitmask would do it per session, but its bits
    /// differ between ORT versions. A switch the user set is left as it is.
    pub fn apply_before_ort(self) {
        if self == StockAttention::NoCudnn && std::env::var_os(CUDNN_SWITCH).is_none() {
            std::env::set_var(CUDNN_SWITCH, "0");
        }
    }

    /// For report headers: what the stock models' attention ops ran with.
    pub fn describe(self) -> String {
        match (self, std::env::var(CUDNN_SWITCH).ok()) {
            (StockAttention::NoCudnn, Some(v)) if v == "0" => format!("every CUDA attention backend of ONNX Runtime but cuDNN flash attention (`--stock-attention no-cudnn`: {CUDNN_SWITCH}=0)"),
            (_, Some(v)) => format!("ONNX Runtime's choice with {CUDNN_SWITCH}={v} as set by the caller"),
            (_, None) => "ONNX Runtime's default choice (`--stock-attention ort-default`)".to_string(),
        }
    }
}

/// Cheap to clone: the environment is shared.
#[derive(Clone)]
pub struct Runtime {
    env: Environment,
    pub plugin: PathBuf,
    pub ort_lib: PathBuf,
    pub threads: usize,
}

/// The ORT shared library: `--ort`, else ORT_DYLIB_PATH, else the wheel in `.venv`.
pub fn find_ort(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    for root in roots() {
        let lib = root.join(".venv/lib");
        let Ok(pythons) = std::fs::read_dir(&lib) else {
            continue;
        };
        for py in pythons.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            if let Ok(files) = std::fs::read_dir(&capi) {
                for f in files.flatten() {
                    if f.file_name()
                        .to_string_lossy()
                        .starts_with("libonnxruntime.so.")
                    {
                        return Ok(f.path());
                    }
                }
            }
        }
    }
    bail!("ONNX Runtime not found: pass --ort PATH/libonnxruntime.so.1.x, set ORT_DYLIB_PATH, or run scripts/setup.sh (installs the onnxruntime wheel into .venv)")
}

/// The plugin: `--plugin`, else POWER_RETENTION_LIB, else beside this executable.
pub fn find_plugin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("POWER_RETENTION_LIB") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locate the executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let lib = dir.join("libpower_retention_ort.so");
        if lib.exists() {
            return Ok(lib);
        }
    }
    bail!("plugin libpower_retention_ort.so not found beside {}: build it (cargo build --release) or pass --plugin", exe.display())
}

/// The repository root (or the current directory) and the executable's ancestors.
fn roots() -> Vec<PathBuf> {
    let mut v = vec![std::env::current_dir().unwrap_or_default()];
    if let Ok(exe) = std::env::current_exe() {
        v.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    v
}

impl Runtime {
    pub fn new(ort_lib: Option<&Path>, plugin: Option<&Path>, threads: usize) -> Result<Runtime> {
        let ort_lib = find_ort(ort_lib)?;
        let plugin = find_plugin(plugin)?;
        let env = ort::init_from(&ort_lib)
            .with_context(|| format!("load ONNX Runtime from {}", ort_lib.display()))?
            .with_name("power-retention")
            .build()
            .context("create the ONNX Runtime environment")?;
        Ok(Runtime {
            env,
            plugin,
            ort_lib,
            threads,
        })
    }

    /// A session with the plugin registered.
    pub fn session(&self, model: &Path, device: Device, cuda_graph: bool) -> Result<Session> {
        self.build(model, device, cuda_graph, true, &[])
    }

    /// A session with the plugin registered and the named symbolic dims of the model fixed
    /// (ORT's free-dimension overrides): with every shape known, ORT folds the shape arithmetic of
    /// exported graphs away, which CUDA-graph capture needs (no node may fall back to the CPU).
    pub fn session_with_dims(
        &self,
        model: &Path,
        device: Device,
        cuda_graph: bool,
        dims: &[(String, i64)],
    ) -> Result<Session> {
        self.build(model, device, cuda_graph, true, dims)
    }

    /// A session of an ordinary model (stock attention), without the plugin.
    pub fn plain_session(&self, model: &Path, device: Device) -> Result<Session> {
        self.build(model, device, false, false, &[])
    }

    fn build(
        &self,
        model: &Path,
        device: Device,
        cuda_graph: bool,
        plugin: bool,
        dims: &[(String, i64)],
    ) -> Result<Session> {
        let mut b = Session::builder(&self.env)?
            .with_intra_threads(self.threads)
            .map_err(builder_error)?;
        for (name, size) in dims {
            b = b
                .with_dimension_override(name, *size)
                .map_err(builder_error)
                .with_context(|| format!("fix dim '{name}' = {size}"))?;
        }
        if plugin {
            b = b
                .with_operator_library(&self.plugin)
                .map_err(builder_error)
                .with_context(|| format!("register {}", self.plugin.display()))?;
        }
        if let Device::Cuda { .. } = device {
            let cuda = ort::ep::CUDA::default()
                .with_cuda_graph(cuda_graph)
                .build()
                .error_on_failure();
            b = b.with_execution_providers([cuda]).map_err(builder_error)?;
        }
        b.commit_from_file(model)
            .with_context(|| format!("load {}", model.display()))
    }
}

/// The builder's errors carry the builder back (not Send); keep the message.
fn builder_error(e: ort::Error<ort::session::builder::SessionBuilder>) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}
