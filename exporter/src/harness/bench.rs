//! `power-retention bench`: per-token decode latency of the rewritten model against the original
//! model with its KV cache, over context lengths and batch sizes, written as a markdown table and
//! an SVG plot. Histories are synthetic (random states and caches of the right size): a step's
//! cost depends on their size, not their values. Correctness is checked separately (`generate`'s
//! equal-work check runs first, on real prompts).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::decoder::PowerModel;
use super::generate::{generate, random_prompts, GenerateOptions};
use super::sampling::Sampling;
use super::stats::{bytes, Breakdown, StepTimes, Summary};
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

/// One (batch, context) point: where each model's decode steps spent their time.
#[derive(Clone, Debug)]
pub struct Row {
    pub context: usize,
    pub batch: usize,
    pub ours: Breakdown,
    /// Stock attention as exported (`None`: skipped, its KV cache over the limit).
    pub stock: Option<Breakdown>,
    /// The same with ONNX Runtime's fused attention op (`None`: not asked for, or skipped).
    pub stock_fused: Option<Breakdown>,
    /// Why `stock` / `stock_fused` is `None`, as written in the table.
    pub stock_why: String,
    pub fused_why: String,
}

/// The models timed against ours: stock attention as exported, and optionally fused.
pub struct Baselines<'a> {
    pub stock: &'a mut StockModel,
    pub fused: Option<&'a mut StockModel>,
}

/// The steps after the first fifth (warm-up).
fn settled(t: &[StepTimes]) -> Option<Breakdown> {
    Breakdown::of(&t[t.len() / 5..])
}

pub fn bench(ours: &mut PowerModel, base: Baselines<'_>, o: &BenchOptions) -> Result<Vec<Row>> {
    let Baselines { stock, mut fused } = base;
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
            let ours_b = settled(&ours.time_steps(batch, context, o.steps, 11)?)
                .context("no timed steps")?;
            // A baseline that fails at one point (typically out of device memory for its KV
            // cache) is reported as such and the sweep goes on; ours failing stops it.
            let time_stock = |m: &mut StockModel, seed| -> (Option<Breakdown>, String) {
                let cache = m.cache_bytes_per_token() * (batch * (context + o.steps)) as u64;
                if cache > o.max_cache_bytes {
                    return (None, format!("skipped (KV cache {} > limit)", bytes(cache)));
                }
                match m.time_steps(batch, context, o.steps, seed) {
                    Ok(t) => (settled(&t), "no timed steps".to_string()),
                    Err(e) => {
                        let first = format!("{e:#}");
                        let short = if first.contains("Failed to allocate memory") {
                            "failed (out of device memory)".to_string()
                        } else {
                            format!("failed ({})", first.chars().take(80).collect::<String>())
                        };
                        eprintln!("B{batch} context {context}: baseline {short}: {first}");
                        (None, short)
                    }
                }
            };
            let (stock_b, stock_why) = time_stock(stock, 12);
            let (fused_b, fused_why) = match fused.as_deref_mut() {
                Some(m) => time_stock(m, 13),
                None => (None, "not asked for".to_string()),
            };
            let show = |b: &Option<Breakdown>, why: &str| {
                b.map_or(why.to_string(), |b| {
                    format!("{:.3} ms/token", b.step.median * 1e3)
                })
            };
            eprintln!(
                "B{batch} context {context}: ours {:.3} ms/token ({}), stock {}{}",
                ours_b.step.median * 1e3,
                ours_b.medians(),
                show(&stock_b, &stock_why),
                if fused.is_some() {
                    format!(", stock fused {}", show(&fused_b, &fused_why))
                } else {
                    String::new()
                }
            );
            rows.push(Row {
                context,
                batch,
                ours: ours_b,
                stock: stock_b,
                stock_fused: fused_b,
                stock_why,
                fused_why,
            });
        }
    }
    write_report(&rows, ours, stock, fused.is_some(), o)?;
    Ok(rows)
}

/// "0.850 (0.910)": median and p90 in ms.
fn ms(s: &Summary) -> String {
    format!("{:.3} ({:.3})", s.median * 1e3, s.p90 * 1e3)
}

/// The markdown report: the latency table and where the time goes.
pub fn render(
    rows: &[Row],
    state_bytes: u64,
    cache_bytes: u64,
    with_fused: bool,
    o: &BenchOptions,
    date: &str,
) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Decode latency: power retention vs stock attention\n")?;
    writeln!(
        md,
        "- device: {}\n- date: {date}\n- command: `{}`",
        o.device_name, o.command
    )?;
    writeln!(
        md,
        "- state per sequence: {} (constant); KV cache per sequence per token: {}\n- {} timed steps per point (median and p90 over the last 80 %); histories are synthetic, of the stated length\n- ms/token: one decode step = token/position ids host→device + the ORT run + logits device→host (as f32 rows); greedy sampling is timed apart (breakdown below)",
        bytes(state_bytes),
        bytes(cache_bytes),
        o.steps
    )?;
    if with_fused {
        writeln!(md, "- stock fused: the same model with ONNX Runtime's fused attention op and its KV cache (com.microsoft.MultiHeadAttention, or GroupQueryAttention where heads are grouped)")?;
    }
    writeln!(md)?;
    let mut head = "| batch | context | ours ms/token (p90) | ours tokens/s | stock ms/token (p90) | stock tokens/s | speed-up |".to_string();
    let mut rule = "|---|---|---|---|---|---|---|".to_string();
    if with_fused {
        head.push_str(" stock fused ms/token (p90) | stock fused tokens/s | speed-up vs fused |");
        rule.push_str("---|---|---|");
    }
    writeln!(md, "{head}\n{rule}")?;
    for r in rows {
        let tps = |b: &Breakdown| r.batch as f64 / b.step.median;
        let cols = |b: &Option<Breakdown>, why: &str| match b {
            Some(s) => format!(
                "{} | {:.0} | {:.2}x",
                ms(&s.step),
                tps(s),
                s.step.median / r.ours.step.median
            ),
            None => format!("{why} | - | -"),
        };
        write!(
            md,
            "| {} | {} | {} | {:.0} | {} |",
            r.batch,
            r.context,
            ms(&r.ours.step),
            tps(&r.ours),
            cols(&r.stock, &r.stock_why)
        )?;
        if with_fused {
            write!(md, " {} |", cols(&r.stock_fused, &r.fused_why))?;
        }
        writeln!(md)?;
    }
    writeln!(
        md,
        "\n## Where the time goes\n\nMedians per decode step, ms: inputs (token and position ids host→device; for stock, also the per-step binding of the caches), run (ORT `Run`), logits (device→host, to f32 rows), sampling (greedy, on the host); step = inputs + run + logits, median of the per-step sums.\n"
    )?;
    writeln!(
        md,
        "| batch | context | model | inputs | run | logits | sampling | step |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for r in rows {
        let models = [
            ("ours", Some(r.ours)),
            ("stock", r.stock),
            ("stock fused", r.stock_fused),
        ];
        for (name, b) in models {
            let Some(b) = b else { continue };
            writeln!(
                md,
                "| {} | {} | {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                r.batch,
                r.context,
                b.inputs.median * 1e3,
                b.run.median * 1e3,
                b.logits.median * 1e3,
                b.sampling.median * 1e3,
                b.step.median * 1e3
            )?;
        }
    }
    Ok(md)
}

fn write_report(
    rows: &[Row],
    ours: &PowerModel,
    stock: &StockModel,
    with_fused: bool,
    o: &BenchOptions,
) -> Result<()> {
    std::fs::create_dir_all(&o.out_dir)
        .with_context(|| format!("create {}", o.out_dir.display()))?;
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let stem = format!("decode-{}-{date}", o.device_name.replace([' ', '/'], "_"));
    let mut md = render(
        rows,
        ours.state_bytes_per_sequence(),
        stock.cache_bytes_per_token(),
        with_fused,
        o,
        &date,
    )?;
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
        .flat_map(|r| [Some(r.ours), r.stock, r.stock_fused].map(|b| b.map(|b| b.step.median)))
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
            .map(|r| (r.context as f64, r.ours.step.median * 1e3))
            .collect();
        let series = |f: fn(&Row) -> Option<Breakdown>| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.batch == b)
                .filter_map(|r| f(r).map(|s| (r.context as f64, s.step.median * 1e3)))
                .collect()
        };
        let stock = series(|r| r.stock);
        let fused = series(|r| r.stock_fused);
        chart
            .draw_series(LineSeries::new(ours, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("power retention, batch {b}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        let dashed = color.mix(0.6);
        if !stock.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(stock, 8, 4, dashed.stroke_width(1)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("stock attention + KV cache, batch {b}"))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], 8, 4, dashed.stroke_width(1))
                });
        }
        if !fused.is_empty() {
            let dotted = color.mix(0.8);
            chart
                .draw_series(DashedLineSeries::new(fused, 2, 3, dotted.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("stock, ORT fused attention + KV cache, batch {b}"))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], 2, 3, dotted.stroke_width(2))
                });
        }
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
