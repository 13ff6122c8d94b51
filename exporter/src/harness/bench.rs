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
    /// On CUDA: which attention kernels the stock models may use (for the report header).
    pub stock_attention: Option<String>,
}

/// One (batch, context) point: where each model's decode steps spent their time.
#[derive(Clone, Debug)]
pub struct Row {
    pub context: usize,
    pub batch: usize,
    pub ours: Breakdown,
    /// Each baseline's, in the order given (`None`: skipped, its KV cache over the limit, or failed).
    pub baselines: Vec<Option<Breakdown>>,
    /// Why a baseline's entry is `None`, as written in the table.
    pub why: Vec<String>,
}

/// A model timed against ours (the original with its KV cache, as exported or as optimised),
/// and its name in the report.
pub struct Baseline<'a> {
    pub label: String,
    pub model: &'a mut StockModel,
}

/// The steps after the first fifth (warm-up).
fn settled(t: &[StepTimes]) -> Option<Breakdown> {
    Breakdown::of(&t[t.len() / 5..])
}

pub fn bench(
    ours: &mut PowerModel,
    mut baselines: Vec<Baseline<'_>>,
    o: &BenchOptions,
) -> Result<Vec<Row>> {
    anyhow::ensure!(!baselines.is_empty(), "no baseline to time against");
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
    // Ours failing at a point (e.g. out of device memory for a batch's session) stops the sweep,
    // but the points already measured are still written, with the reason they end there.
    let mut stopped = None;
    'sweep: for &batch in &o.batches {
        for &context in &o.contexts {
            let ours_b = match ours
                .time_steps(batch, context, o.steps, 11)
                .and_then(|t| settled(&t).context("no timed steps"))
            {
                Ok(b) => b,
                Err(e) => {
                    let e = e.context(format!("ours at batch {batch}, context {context}"));
                    eprintln!("B{batch} context {context}: ours failed, the sweep stops: {e:#}");
                    stopped = Some(e);
                    break 'sweep;
                }
            };
            // A baseline that fails at one point (typically out of device memory for its KV
            // cache) is reported as such and the sweep goes on; ours failing stops it.
            let time_stock = |m: &mut StockModel, seed| -> (Option<Breakdown>, String) {
                let cache = m.cache_bytes_per_token() * (batch * (context + o.steps)) as u64;
                if cache > o.max_cache_bytes {
                    return (None, format!("skipped (KV cache {} > limit)", bytes(cache)));
                }
                let timed = m.time_steps(batch, context, o.steps, seed);
                // Its arena's peak is of no use to the next model timed.
                if let Err(e) = m.release_memory() {
                    return (None, format!("failed ({e:#})"));
                }
                match timed {
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
            let (timed, why): (Vec<_>, Vec<_>) = baselines
                .iter_mut()
                .enumerate()
                .map(|(i, b)| time_stock(b.model, 12 + i as u64))
                .unzip();
            let mut line = format!(
                "B{batch} context {context}: ours {:.3} ms/token ({})",
                ours_b.step.median * 1e3,
                ours_b.medians()
            );
            for ((b, t), w) in baselines.iter().zip(&timed).zip(&why) {
                let shown = t.map_or(w.clone(), |t| {
                    format!("{:.3} ms/token", t.step.median * 1e3)
                });
                let _ = write!(line, ", {} {shown}", b.label);
            }
            eprintln!("{line}");
            rows.push(Row {
                context,
                batch,
                ours: ours_b,
                baselines: timed,
                why,
            });
        }
    }
    let labels: Vec<String> = baselines.iter().map(|b| b.label.clone()).collect();
    let cache = baselines[0].model.cache_bytes_per_token();
    let why_stopped = stopped.as_ref().map(|e| format!("{e:#}"));
    write_report(&rows, ours, cache, &labels, why_stopped.as_deref(), o)?;
    match stopped {
        Some(e) => Err(e.context(format!(
            "the sweep stopped after {} point(s); the report holds those",
            rows.len()
        ))),
        None => Ok(rows),
    }
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
    labels: &[String],
    stopped: Option<&str>,
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
    writeln!(
        md,
        "- baselines (each the original model with its KV cache, driven by the same code): {}",
        labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    if let Some(a) = &o.stock_attention {
        writeln!(md, "- stock models' fused attention ops may use: {a}")?;
    }
    writeln!(md)?;
    let mut head = "| batch | context | ours ms/token (p90) | ours tokens/s |".to_string();
    let mut rule = "|---|---|---|---|".to_string();
    for l in labels {
        write!(
            head,
            " {l} ms/token (p90) | {l} tokens/s | speed-up vs {l} |"
        )?;
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
            "| {} | {} | {} | {:.0} |",
            r.batch,
            r.context,
            ms(&r.ours.step),
            tps(&r.ours),
        )?;
        for (b, why) in r.baselines.iter().zip(&r.why) {
            write!(md, " {} |", cols(b, why))?;
        }
        writeln!(md)?;
    }
    if let Some(why) = stopped {
        // One line: a multi-line ORT message would break the markdown.
        let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
        writeln!(md, "\n**The sweep stopped here**: {why}")?;
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
        let models = std::iter::once(("ours", Some(r.ours))).chain(
            labels
                .iter()
                .map(String::as_str)
                .zip(r.baselines.iter().copied()),
        );
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
    cache_bytes: u64,
    labels: &[String],
    stopped: Option<&str>,
    o: &BenchOptions,
) -> Result<()> {
    std::fs::create_dir_all(&o.out_dir)
        .with_context(|| format!("create {}", o.out_dir.display()))?;
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let stem = format!("decode-{}-{date}", o.device_name.replace([' ', '/'], "_"));
    let mut md = render(
        rows,
        ours.state_bytes_per_sequence(),
        cache_bytes,
        labels,
        stopped,
        o,
        &date,
    )?;
    let svg = o.out_dir.join(format!("{stem}.svg"));
    if !rows.is_empty() {
        plot(rows, labels, &svg, &o.device_name)?;
        writeln!(
            md,
            "\n![latency per token vs context]({})",
            svg.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        )?;
    }
    let path = o.out_dir.join(format!("{stem}.md"));
    std::fs::write(&path, md).with_context(|| format!("write {}", path.display()))?;
    if rows.is_empty() {
        println!("wrote {}", path.display());
    } else {
        println!("wrote {} and {}", path.display(), svg.display());
    }
    Ok(())
}

fn plot(rows: &[Row], labels: &[String], path: &Path, device: &str) -> Result<()> {
    let max_ms = rows
        .iter()
        .flat_map(|r| std::iter::once(Some(r.ours)).chain(r.baselines.iter().copied()))
        .flatten()
        .map(|b| b.step.median)
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
        chart
            .draw_series(LineSeries::new(ours, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("power retention, batch {b}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        // One dash pattern per baseline: long dashes for the first, shorter for the next.
        for (k, label) in labels.iter().enumerate() {
            let series: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.batch == b)
                .filter_map(|r| r.baselines[k].map(|s| (r.context as f64, s.step.median * 1e3)))
                .collect();
            if series.is_empty() {
                continue;
            }
            let (dash, gap) = [(8, 4), (2, 3), (5, 2), (1, 2)][k % 4];
            let style = color
                .mix(0.6 + 0.1 * (k % 3) as f64)
                .stroke_width(1 + (k % 2) as u32);
            chart
                .draw_series(DashedLineSeries::new(series, dash, gap, style))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("{label} + KV cache, batch {b}"))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], dash, gap, style)
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
