//! `power-retention`: rewrites softmax attention in exported GPT ONNX models into power retention.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use onnx_protobuf::ModelProto;

use power_retention_exporter::emit::{self, Options, Target};
use power_retention_exporter::{analyse, harness, onnx_io, report};
use power_retention_schema::POWER_RETENTION;

#[derive(Parser)]
#[command(
    name = "power-retention",
    version,
    about = "Rewrite softmax attention in ONNX GPT models into power retention"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the attention blocks found, and every rejected candidate with the reason.
    Inspect {
        /// The exported model (.onnx; external data is found beside it).
        model: PathBuf,
    },
    /// Write OUT_DIR/prefill.onnx, OUT_DIR/decode.onnx and OUT_DIR/retention.json.
    Rewrite {
        /// The exported model (.onnx; external data is found beside it).
        model: PathBuf,
        /// Directory for prefill.onnx, decode.onnx, retention.json (and the external data).
        #[arg(short, long = "output")]
        out_dir: PathBuf,
        #[arg(long, value_enum, default_value = "power-retention")]
        target: Target,
        /// Power of the attention weights [default: the op table's default]
        #[arg(long)]
        deg: Option<i64>,
        /// Tokens per chunk in the prefill op [default: the op table's default]
        #[arg(long)]
        chunk_size: Option<i64>,
        /// Decode window cache capacity C.
        #[arg(long, default_value_t = 64)]
        cache_capacity: i64,
        /// Rewrite the blocks that match even if other candidates were rejected.
        #[arg(long)]
        allow_partial: bool,
    },
    /// Decode with a rewritten model, the state kept in place; report latency, memory, equal work.
    Generate(harness::cli::GenerateArgs),
    /// Time decoding against the original model with its KV cache, over context lengths.
    Bench(harness::cli::BenchArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => harness::cli::run_generate(&args),
        Command::Bench(args) => harness::cli::run_bench(&args),
        Command::Inspect { model } => {
            let m = onnx_io::load(&model)?;
            print!("{}", report::render(&analyse(&m)?));
            Ok(())
        }
        Command::Rewrite {
            model,
            out_dir,
            target,
            deg,
            chunk_size,
            cache_capacity,
            allow_partial,
        } => {
            let m = onnx_io::load(&model)?;
            let a = analyse(&m)?;
            print!("{}", report::render(&a));
            if a.blocks.is_empty() {
                bail!("no attention block could be rewritten; nothing written");
            }
            if !a.rejections.is_empty() && !allow_partial {
                bail!(
                    "{} candidate(s) rejected (see above); refusing to write a partially rewritten model (pass --allow-partial to rewrite only the matched blocks)",
                    a.rejections.len()
                );
            }
            let opts = Options {
                target,
                deg: deg.unwrap_or(emit::default_int(&POWER_RETENTION, "deg")?),
                chunk_size: chunk_size
                    .unwrap_or(emit::default_int(&POWER_RETENTION, "chunk_size")?),
                cache_capacity,
            };
            let out = emit::emit(&m, &a.blocks, &opts)?;
            write_outputs(&m, &model, &out_dir, &out)?;
            println!(
                "wrote {} attention block(s) to {}",
                a.blocks.len(),
                out_dir.display()
            );
            if !a.rejections.is_empty() {
                // --allow-partial: the refused layers are left as exported.
                println!(
                    "warning: {} refused candidate(s) left as exported; decode.onnx does not carry a state or cache for them, so decoding is not equivalent there",
                    a.rejections.len()
                );
            }
            let has_mask = m
                .graph
                .as_ref()
                .is_some_and(|g| g.input.iter().any(|i| i.name == "attention_mask"));
            if has_mask {
                // The mask cones are gone: only causality was kept.
                println!(
                    "note: power retention has no padding mask; padded positions in attention_mask are not masked out (feed unpadded sequences)"
                );
            }
            Ok(())
        }
    }
}

fn write_outputs(m: &ModelProto, model: &Path, out_dir: &Path, out: &emit::Emitted) -> Result<()> {
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let src_dir = model.parent().unwrap_or(Path::new("."));
    onnx_io::copy_external(&onnx_io::external_files(m)?, src_dir, out_dir)?;
    onnx_io::save(&out.prefill, &out_dir.join("prefill.onnx"))?;
    onnx_io::save(&out.decode, &out_dir.join("decode.onnx"))?;
    let json = serde_json::to_string_pretty(&out.manifest)?;
    fs::write(out_dir.join("retention.json"), json + "\n")
        .with_context(|| format!("writing {}", out_dir.join("retention.json").display()))
}
