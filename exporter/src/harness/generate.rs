//! `power-retention generate`: prefill the prompts, decode token by token with the state kept in
//! place, report latency and memory, and check that decoding did the same work as prefill.

use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::decoder::PowerModel;
use super::sampling::{Sampler, Sampling};
use super::stats::{bytes, Breakdown, StepTimes, Summary};

pub struct GenerateOptions {
    pub prompts: Vec<Vec<i64>>,
    pub new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Re-run prefill over prompt + generated tokens and compare logits with the decode steps.
    pub check: bool,
    pub progress: bool,
}

pub struct GenerateReport {
    pub tokens: Vec<Vec<i64>>,
    pub prefill_seconds: f64,
    pub step: Option<Summary>,
    /// Where the steps' time went (medians of inputs, run, logits, sampling).
    pub breakdown: Option<Breakdown>,
    pub tokens_per_second: f64,
    pub state_bytes: u64,
    /// Largest ‖decode − prefill‖/‖prefill‖ over the generated positions, if checked.
    pub check_error: Option<f64>,
}

/// Random prompts of the given lengths over a vocabulary of `vocab` tokens.
pub fn random_prompts(lengths: &[usize], vocab: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    lengths
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..vocab as i64)).collect())
        .collect()
}

pub fn generate(model: &mut PowerModel, opts: &GenerateOptions) -> Result<GenerateReport> {
    let b = opts.prompts.len();
    if b == 0 {
        bail!("no prompts");
    }
    let t0 = Instant::now();
    let (mut st, first) = model.start(&opts.prompts)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let mut samplers: Vec<Sampler> = (0..b)
        .map(|i| Sampler::new(opts.sampling, opts.seed.wrapping_add(i as u64)))
        .collect();
    let mut next: Vec<i64> = first
        .iter()
        .zip(samplers.iter_mut())
        .map(|(l, s)| s.next(l) as i64)
        .collect();
    let mut generated: Vec<Vec<i64>> = next.iter().map(|&t| vec![t]).collect();
    let mut step_logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); b];
    let bar = (opts.progress && opts.new_tokens >= 64).then(|| {
        let bar = ProgressBar::new(opts.new_tokens as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut times = Vec::with_capacity(opts.new_tokens);
    let mut parts: Vec<StepTimes> = Vec::with_capacity(opts.new_tokens);
    for _ in 1..opts.new_tokens {
        let t = Instant::now();
        let (logits, mut part) = model.step(&mut st, &next)?;
        times.push(t.elapsed().as_secs_f64());
        let ts = Instant::now();
        for (bi, l) in logits.iter().enumerate() {
            next[bi] = samplers[bi].next(l) as i64;
        }
        part.sampling = ts.elapsed().as_secs_f64();
        parts.push(part);
        for (bi, l) in logits.into_iter().enumerate() {
            generated[bi].push(next[bi]);
            if opts.check {
                step_logits[bi].push(l);
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let step = Summary::of(&times);
    let breakdown = Breakdown::of(&parts);
    let tokens_per_second = step.map_or(0.0, |s| b as f64 / s.mean);
    let check_error = if opts.check {
        Some(check_against_prefill(
            model,
            &opts.prompts,
            &generated,
            &step_logits,
        )?)
    } else {
        None
    };
    Ok(GenerateReport {
        tokens: generated,
        prefill_seconds,
        step,
        breakdown,
        tokens_per_second,
        state_bytes: model.state_bytes_per_sequence() * b as u64,
        check_error,
    })
}

/// Decode step j of sequence β consumed token generated[β][j] at position P + j; prefill over the
/// prompt and the generated tokens gives the logits at that position directly.
fn check_against_prefill(
    model: &mut PowerModel,
    prompts: &[Vec<i64>],
    generated: &[Vec<i64>],
    step_logits: &[Vec<Vec<f32>>],
) -> Result<f64> {
    let mut worst = 0.0f64;
    for (bi, prompt) in prompts.iter().enumerate() {
        let steps = step_logits[bi].len();
        if steps == 0 {
            continue;
        }
        let mut all = prompt.clone();
        all.extend_from_slice(&generated[bi][..steps]);
        let (rows, _) = model.prefill_one(&all)?;
        for (j, got) in step_logits[bi].iter().enumerate() {
            let want = &rows[prompt.len() + j];
            let num: f64 = got
                .iter()
                .zip(want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let den: f64 = want
                .iter()
                .map(|&b| (b as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(f64::MIN_POSITIVE);
            let e = if num.is_finite() {
                num / den
            } else {
                f64::INFINITY
            };
            worst = worst.max(e);
        }
    }
    Ok(worst)
}

impl GenerateReport {
    pub fn print(&self, device: &str, batch: usize) {
        println!("device            {device}");
        println!("batch             {batch} (prompt lengths decided per sequence; no padding)");
        println!("prefill           {:.1} ms", self.prefill_seconds * 1e3);
        if let Some(s) = self.step {
            println!(
                "per-token latency median {:.3} ms, p90 {:.3} ms over {} steps",
                s.median * 1e3,
                s.p90 * 1e3,
                s.n
            );
            println!("throughput        {:.1} tokens/s", self.tokens_per_second);
        }
        if let Some(b) = &self.breakdown {
            println!("per-step medians  {}", b.medians());
        }
        println!(
            "state memory      {} for the batch (constant in context length)",
            bytes(self.state_bytes)
        );
        if let Some(e) = self.check_error {
            println!("equal-work check  decode logits vs prefill logits at the same positions: max rel err {e:.2e}");
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let shown: Vec<String> = t.iter().take(16).map(|x| x.to_string()).collect();
            println!(
                "sequence {i}: {}{}",
                shown.join(" "),
                if t.len() > 16 { " …" } else { "" }
            );
        }
    }
}
