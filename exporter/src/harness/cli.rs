//! Command-line arguments of `generate` and `bench`, and what they run.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use super::bench::{bench, Baseline, BenchOptions};
use super::decoder::PowerModel;
use super::generate::{generate, random_prompts, GenerateOptions};
use super::runtime::{Device, Runtime, StockAttention};
use super::sampling::Sampling;
use super::stock::StockModel;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Where and how the models run.
#[derive(Args, Debug)]
pub struct RuntimeArgs {
    /// cpu, or cuda (ONNX Runtime's CUDA execution provider)
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// With --device cuda: replay the decode step from a CUDA graph
    #[arg(long)]
    pub cuda_graph: bool,
    /// The plugin (default: libpower_retention_ort.so beside this executable, or POWER_RETENTION_LIB)
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// ONNX Runtime's libonnxruntime.so (default: ORT_DYLIB_PATH, or the wheel in .venv)
    #[arg(long)]
    pub ort: Option<PathBuf>,
    /// Intra-op threads for CPU work
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

impl RuntimeArgs {
    /// The device and an ONNX Runtime with the plugin, as the arguments ask.
    fn open(&self) -> Result<(Device, Runtime)> {
        let device = self.device()?;
        Ok((
            device,
            Runtime::new(self.ort.as_deref(), self.plugin.as_deref(), self.threads)?,
        ))
    }

    fn device(&self) -> Result<Device> {
        match (self.device, self.cuda_graph) {
            (DeviceArg::Cpu, true) => bail!("--cuda-graph needs --device cuda"),
            (DeviceArg::Cpu, false) => Ok(Device::Cpu),
            (DeviceArg::Cuda, graph) => Ok(Device::Cuda { graph }),
        }
    }
}

/// `power-retention generate MODEL_DIR`: decode with the state kept in place.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A rewritten model directory (prefill.onnx, decode.onnx, retention.json)
    pub model_dir: PathBuf,
    /// Prompt token ids, one sequence per occurrence ("12 7 99"); default: random prompts
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// Lengths of the random prompts, one sequence each (ragged batches allowed)
    #[arg(long, value_delimiter = ',', default_value = "12,31,5,20")]
    pub prompt_lengths: Vec<usize>,
    /// Tokens to generate per sequence
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// greedy, top-k=K or top-p=P, optionally followed by ,t=TEMPERATURE
    #[arg(long, default_value = "greedy")]
    pub sampling: Sampling,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the check that decode logits equal prefill logits at the same positions
    #[arg(long)]
    pub no_check: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run_generate(a: &GenerateArgs) -> Result<()> {
    let (device, rt) = a.runtime.open()?;
    let mut model = PowerModel::load(&rt, &a.model_dir, device)?;
    let prompts: Vec<Vec<i64>> = if a.prompts.is_empty() {
        let vocab = model.vocab_size()?;
        random_prompts(&a.prompt_lengths, vocab, a.seed)
    } else {
        a.prompts
            .iter()
            .map(|p| {
                p.split_whitespace()
                    .map(|t| {
                        t.parse::<i64>()
                            .map_err(|_| anyhow::anyhow!("prompt token '{t}' is not an integer id"))
                    })
                    .collect()
            })
            .collect::<Result<_>>()?
    };
    let opts = GenerateOptions {
        prompts,
        new_tokens: a.new_tokens.max(1),
        sampling: a.sampling,
        seed: a.seed,
        check: !a.no_check,
        progress: true,
    };
    let report = generate(&mut model, &opts)?;
    println!(
        "runtime           ONNX Runtime {}, plugin {}",
        rt.ort_lib.display(),
        rt.plugin.display()
    );
    report.print(device.name(), opts.prompts.len());
    if let Some(e) = report.check_error {
        let tol = model.check_tolerance();
        if e > tol {
            bail!("equal-work check failed: decode logits differ from prefill logits by {e:.2e} (tolerance {tol:.0e})");
        }
    }
    Ok(())
}

/// `power-retention bench MODEL_DIR --stock ORIGINAL.onnx`: latency per token against stock attention.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A rewritten model directory (prefill.onnx, decode.onnx, retention.json)
    pub model_dir: PathBuf,
    /// The original model with its KV cache (past_key_values.* inputs, present.* outputs)
    #[arg(long)]
    pub stock: PathBuf,
    /// More baselines, each LABEL=MODEL.onnx with the same interface as --stock (e.g. the model
    /// after ORT's transformer optimizer, or exported with a fused attention op), timed the same
    /// way, in their own columns; repeatable
    #[arg(long = "baseline", value_name = "LABEL=MODEL", value_parser = parse_baseline)]
    pub baselines: Vec<(String, PathBuf)>,
    /// Context lengths to time at
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384,32768,65536,131072"
    )]
    pub contexts: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batches: Vec<usize>,
    /// Timed decode steps per point
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Largest KV cache the stock run may build, in GiB (points beyond are reported as skipped)
    #[arg(long, default_value_t = 8.0)]
    pub max_cache_gib: f64,
    /// Where the markdown table and the plot go
    #[arg(long, default_value = "benches/results")]
    pub out: PathBuf,
    /// Device description for the report header (default: the --device name)
    #[arg(long)]
    pub device_name: Option<String>,
    /// On CUDA, the attention kernels ONNX Runtime may use for the stock models' fused attention
    /// ops: no-cudnn (default; with cuDNN's flash attention ORT 1.31 pays ≈60 ms at every new KV
    /// length, i.e. every step) or ort-default
    #[arg(long, value_enum, default_value = "no-cudnn")]
    pub stock_attention: StockAttention,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run_bench(a: &BenchArgs) -> Result<()> {
    a.stock_attention.apply_before_ort();
    let (device, rt) = a.runtime.open()?;
    let mut ours = PowerModel::load(&rt, &a.model_dir, device)?;
    let mut models = vec![(
        "stock".to_string(),
        StockModel::load(&rt, &a.stock, device)?,
    )];
    for (label, path) in &a.baselines {
        let m = StockModel::load(&rt, path, device)
            .with_context(|| format!("baseline '{label}' ({})", path.display()))?;
        models.push((label.clone(), m));
    }
    // As typed: arguments with spaces quoted, so the report's command can be pasted back.
    let command = std::env::args()
        .map(|x| if x.contains(' ') { format!("'{x}'") } else { x })
        .collect::<Vec<_>>()
        .join(" ");
    let o = BenchOptions {
        contexts: a.contexts.clone(),
        batches: a.batches.clone(),
        steps: a.steps.max(5),
        max_cache_bytes: (a.max_cache_gib * (1u64 << 30) as f64) as u64,
        out_dir: a.out.clone(),
        device_name: a
            .device_name
            .clone()
            .unwrap_or_else(|| device.name().to_string()),
        command,
        stock_attention: match device {
            Device::Cpu => None,
            Device::Cuda { .. } => Some(a.stock_attention.describe()),
        },
    };
    let baselines = models
        .iter_mut()
        .map(|(label, model)| Baseline {
            label: label.clone(),
            model,
        })
        .collect();
    bench(&mut ours, baselines, &o)?;
    Ok(())
}

/// `LABEL=PATH` of `--baseline`: a non-empty label without `|` (it heads table columns).
fn parse_baseline(s: &str) -> Result<(String, PathBuf), String> {
    let (label, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected LABEL=MODEL.onnx, got '{s}'"))?;
    let label = label.trim();
    if label.is_empty() || label.contains('|') || label == "ours" || label == "stock" {
        return Err(format!(
            "baseline label '{label}': give a non-empty name other than 'ours' / 'stock', without '|'"
        ));
    }
    if path.is_empty() {
        return Err(format!("baseline '{label}': no model path after '='"));
    }
    Ok((label.to_string(), PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::parse_baseline;

    #[test]
    fn baseline_arguments_need_a_label_and_a_path() {
        assert_eq!(
            parse_baseline("ORT optimizer=/tmp/m.onnx").unwrap(),
            ("ORT optimizer".to_string(), "/tmp/m.onnx".into())
        );
        for bad in [
            "/tmp/m.onnx",
            "=/tmp/m.onnx",
            "a|b=/tmp/m.onnx",
            "stock=x.onnx",
            "x=",
        ] {
            let e = parse_baseline(bad).unwrap_err();
            assert!(
                e.contains("LABEL") || e.contains("label") || e.contains("path"),
                "{bad}: {e}"
            );
        }
    }
}
