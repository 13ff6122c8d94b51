//! Choosing the next token from logits: greedy, or seeded top-k / top-p sampling.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Keep the k most likely tokens, sample among them.
    TopK {
        k: usize,
        temperature: f32,
    },
    /// Keep the smallest set of most likely tokens whose probability reaches p, sample among them.
    TopP {
        p: f32,
        temperature: f32,
    },
}

impl std::str::FromStr for Sampling {
    type Err = String;

    /// `greedy`, `top-k=40`, `top-p=0.9`, each optionally followed by `,t=0.8` (temperature).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let mut temperature = 1.0f32;
        for p in parts {
            match p.strip_prefix("t=").map(str::parse::<f32>) {
                Some(Ok(t)) if t > 0.0 && t.is_finite() => temperature = t,
                _ => {
                    return Err(format!(
                        "bad sampling option '{p}': expected t=<positive temperature>"
                    ))
                }
            }
        }
        if head == "greedy" {
            return Ok(Sampling::Greedy);
        }
        if let Some(k) = head.strip_prefix("top-k=") {
            let k: usize = k
                .parse()
                .map_err(|_| format!("top-k wants a positive integer, got '{k}'"))?;
            if k == 0 {
                return Err("top-k wants k ≥ 1".into());
            }
            return Ok(Sampling::TopK { k, temperature });
        }
        if let Some(p) = head.strip_prefix("top-p=") {
            let p: f32 = p
                .parse()
                .map_err(|_| format!("top-p wants a probability, got '{p}'"))?;
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top-p wants 0 < p ≤ 1, got {p}"));
            }
            return Ok(Sampling::TopP { p, temperature });
        }
        Err(format!(
            "unknown sampling '{s}': use greedy, top-k=K or top-p=P (optionally ,t=T)"
        ))
    }
}

/// A sampler with its own seeded generator (one per sequence keeps batches reproducible).
pub struct Sampler {
    how: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(how: Sampling, seed: u64) -> Sampler {
        Sampler {
            how,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn next(&mut self, logits: &[f32]) -> usize {
        match self.how {
            Sampling::Greedy => argmax(logits),
            Sampling::TopK { k, temperature } => {
                let mut idx = ranked(logits);
                idx.truncate(k.min(idx.len()));
                self.draw(logits, &idx, temperature)
            }
            Sampling::TopP { p, temperature } => {
                let idx = ranked(logits);
                let probs = softmax(logits, &idx, temperature);
                let mut acc = 0.0;
                let keep = probs.iter().position(|&x| {
                    acc += x;
                    acc >= p as f64
                });
                let keep = keep.map_or(idx.len(), |i| i + 1);
                self.draw(logits, &idx[..keep], temperature)
            }
        }
    }

    fn draw(&mut self, logits: &[f32], idx: &[usize], temperature: f32) -> usize {
        let probs = softmax(logits, idx, temperature);
        let mut u: f64 = self.rng.random();
        for (&i, &p) in idx.iter().zip(&probs) {
            if u < p {
                return i;
            }
            u -= p;
        }
        idx[idx.len() - 1]
    }
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Token indices by descending logit (NaN last).
fn ranked(logits: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx
}

fn softmax(logits: &[f32], idx: &[usize], temperature: f32) -> Vec<f64> {
    let m = idx
        .iter()
        .map(|&i| logits[i] as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / temperature as f64).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        assert_eq!(
            Sampler::new(Sampling::Greedy, 0).next(&[0.1, 3.0, -1.0, 2.9]),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_stays_inside_the_k_best() {
        let logits = [0.0, 5.0, 4.9, -3.0, 4.8, 1.0];
        let mut s = Sampler::new("top-k=1".parse().unwrap(), 7);
        assert!((0..50).all(|_| s.next(&logits) == 1));
        let mut s = Sampler::new("top-k=3,t=2".parse().unwrap(), 7);
        let seen: std::collections::BTreeSet<usize> = (0..400).map(|_| s.next(&logits)).collect();
        assert_eq!(seen, [1, 2, 4].into_iter().collect());
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities ≈ [0.64, 0.24, 0.09, 0.03]: p = 0.8 keeps the first two.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut s = Sampler::new("top-p=0.8".parse().unwrap(), 3);
        let seen: std::collections::BTreeSet<usize> = (0..500).map(|_| s.next(&logits)).collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
    }

    #[test]
    fn sampling_is_reproducible_from_the_seed() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new("top-p=0.95".parse().unwrap(), seed);
            (0..20).map(|_| s.next(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn bad_sampling_specs_are_refused() {
        for s in ["top-k=0", "top-p=1.5", "nucleus", "top-k=3,t=-1"] {
            assert!(s.parse::<Sampling>().is_err(), "{s}");
        }
    }
}
