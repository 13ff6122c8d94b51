//! `power-retention bench`: per-token decode latency of the rewritten model against the original
//! model with its KV cache, over context lengths and batch sizes, written as a markdown table and
//! an SVG plot. Histories are synthetic (random states and caches of the right size): a step's
//! cost depends on their size, not their values. Correctness is checked separately (`generate`'s
//! equal-work check runs first, on real prompts).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::decoder::PowerModel;
use super::generate::{generate, random_prompts, GenerateOptions};
use super::sampling::Sampling;
use super::stats::{bytes, Summary};
use super::stock::StockModel;

pub struct BenchOptions {
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    pub steps: usize,
    /// Skip a stock run whose KV cache would exceed this many bytes.
    pub max_cache_bytes: u64,
    pub out_dir: PathBuf,
    pub device_name: String,
    pub command: String,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub context: usize,
    pub batch: usize,
    pub ours: Summary,
    pub stock: Option<Summary>,
}

pub fn bench(ours: &mut PowerModel, stock: &mut StockModel, o: &BenchOptions) -> Result<Vec<Row>> {
    // Equal work first: a timing of wrong logits is worse than none.
    let vocab_probe = random_prompts(&[8, 13], 2, 1);
    let check = generate(
        ours,
        &GenerateOptions {
            prompts: vocab_probe,
            new_tokens: 12,
            sampling: Sampling::Greedy,
            seed: 0,
            check: true,
            progress: false,
        },
    )?;
    let err = check.check_error.unwrap_or(f64::INFINITY);
    anyhow::ensure!(err < 1e-2, "decode logits differ from prefill logits (rel err {err:.2e}): refusing to time a wrong result");
    let mut rows = Vec::new();
    for &batch in &o.batches {
        for &context in &o.contexts {
            let t = ours.time_steps(batch, context, o.steps, 11)?;
            let ours_s = Summary::of(&t[t.len() / 5..]).context("no timed steps")?;
            let cache = stock.cache_bytes_per_token() * (batch * (context + o.steps)) as u64;
            let stock_s = if cache <= o.max_cache_bytes {
                let t = stock.time_steps(batch, context, o.steps, 12)?;
                Summary::of(&t[t.len() / 5..])
            } else {
                None
            };
            eprintln!(
                "B{batch} context {context}: ours {:.3} ms/token, stock {}",
                ours_s.median * 1e3,
                stock_s.map_or(
                    format!("skipped (KV cache {} > limit)", bytes(cache)),
                    |s| format!("{:.3} ms/token", s.median * 1e3)
                )
            );
            rows.push(Row {
                context,
                batch,
                ours: ours_s,
                stock: stock_s,
            });
        }
    }
    write_report(&rows, ours, stock, o)?;
    Ok(rows)
}

fn write_report(
    rows: &[Row],
    ours: &PowerModel,
    stock: &StockModel,
    o: &BenchOptions,
) -> Result<()> {
    std::fs::create_dir_all(&o.out_dir)
        .with_context(|| format!("create {}", o.out_dir.display()))?;
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let stem = format!("decode-{}-{date}", o.device_name.replace([' ', '/'], "_"));
    let mut md = String::new();
    writeln!(md, "# Decode latency: power retention vs stock attention\n")?;
    writeln!(
        md,
        "- device: {}\n- date: {date}\n- command: `{}`",
        o.device_name, o.command
    )?;
    writeln!(
        md,
        "- state per sequence: {} (constant); KV cache per sequence per token: {}\n- {} timed steps per point (median and p90 over the last 80 %); histories are synthetic, of the stated length\n",
        bytes(ours.state_bytes_per_sequence()),
        bytes(stock.cache_bytes_per_token()),
        o.steps
    )?;
    writeln!(md, "| batch | context | ours ms/token (p90) | ours tokens/s | stock ms/token (p90) | stock tokens/s | speed-up |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for r in rows {
        let tps = |s: &Summary| r.batch as f64 / s.median;
        let (st, stps, up) = match &r.stock {
            Some(s) => (
                format!("{:.3} ({:.3})", s.median * 1e3, s.p90 * 1e3),
                format!("{:.0}", tps(s)),
                format!("{:.2}x", s.median / r.ours.median),
            ),
            None => ("skipped (memory)".into(), "-".into(), "-".into()),
        };
        writeln!(
            md,
            "| {} | {} | {:.3} ({:.3}) | {:.0} | {st} | {stps} | {up} |",
            r.batch,
            r.context,
            r.ours.median * 1e3,
            r.ours.p90 * 1e3,
            tps(&r.ours)
        )?;
    }
    let svg = o.out_dir.join(format!("{stem}.svg"));
    plot(rows, &svg, &o.device_name)?;
    writeln!(
        md,
        "\n![latency per token vs context]({})",
        svg.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    )?;
    let path = o.out_dir.join(format!("{stem}.md"));
    std::fs::write(&path, md).with_context(|| format!("write {}", path.display()))?;
    println!("wrote {} and {}", path.display(), svg.display());
    Ok(())
}

fn plot(rows: &[Row], path: &Path, device: &str) -> Result<()> {
    let max_ms = rows
        .iter()
        .flat_map(|r| [Some(r.ours.median), r.stock.map(|s| s.median)])
        .flatten()
        .fold(0.0f64, f64::max)
        * 1e3
        * 1.15;
    let (cmin, cmax) = rows.iter().fold((usize::MAX, 0), |(a, b), r| {
        (a.min(r.context), b.max(r.context))
    });
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("decode latency per token ({device})"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (cmin.max(1) as f64..cmax.max(2) as f64).log_scale(),
            0.0..max_ms.max(1e-3),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("context (tokens)")
        .y_desc("ms per token")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut batches: Vec<usize> = rows.iter().map(|r| r.batch).collect();
    batches.dedup();
    for (i, &b) in batches.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let ours: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.batch == b)
            .map(|r| (r.context as f64, r.ours.median * 1e3))
            .collect();
        let stock: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.batch == b)
            .filter_map(|r| r.stock.map(|s| (r.context as f64, s.median * 1e3)))
            .collect();
        chart
            .draw_series(LineSeries::new(ours, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("power retention, batch {b}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        let dashed = color.mix(0.6);
        chart
            .draw_series(LineSeries::new(stock, dashed.stroke_width(1)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("stock attention + KV cache, batch {b}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], dashed.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
