//! Latency summaries.

/// Median, 90th percentile and mean of a set of durations in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub p90: f64,
    pub mean: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(times: &[f64]) -> Option<Summary> {
        if times.is_empty() {
            return None;
        }
        let mut v = times.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Some(Summary {
            median: q(0.5),
            p90: q(0.9),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            n: v.len(),
        })
    }
}

/// Where one decode step's time went, in seconds: token and position ids from the host to the
/// device (and any per-step binding), the ORT run, the logits from the device to the host (as f32
/// rows), and choosing the next tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    pub inputs: f64,
    pub run: f64,
    pub logits: f64,
    pub sampling: f64,
}

impl StepTimes {
    /// From the instants taken before the inputs, the run, the logits copy, and after it
    /// (`sampling` left at 0: the caller samples).
    pub fn between(marks: [std::time::Instant; 4]) -> StepTimes {
        let secs = |i: usize| (marks[i + 1] - marks[i]).as_secs_f64();
        StepTimes {
            inputs: secs(0),
            run: secs(1),
            logits: secs(2),
            sampling: 0.0,
        }
    }

    /// The decode step proper: inputs + run + logits (what `generate` and `bench` report per
    /// token; sampling is reported beside it).
    pub fn step(&self) -> f64 {
        self.inputs + self.run + self.logits
    }
}

/// Summaries of each part of a set of decode steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Breakdown {
    pub inputs: Summary,
    pub run: Summary,
    pub logits: Summary,
    pub sampling: Summary,
    /// Of each step's inputs + run + logits (not the sum of the parts' medians).
    pub step: Summary,
}

impl Breakdown {
    pub fn of(times: &[StepTimes]) -> Option<Breakdown> {
        let part = |f: fn(&StepTimes) -> f64| Summary::of(&times.iter().map(f).collect::<Vec<_>>());
        Some(Breakdown {
            inputs: part(|t| t.inputs)?,
            run: part(|t| t.run)?,
            logits: part(|t| t.logits)?,
            sampling: part(|t| t.sampling)?,
            step: part(StepTimes::step)?,
        })
    }

    /// "inputs 0.012 ms, run 0.801 ms, logits 0.020 ms, sampling 0.015 ms" (medians).
    pub fn medians(&self) -> String {
        format!(
            "inputs {:.3} ms, run {:.3} ms, logits {:.3} ms, sampling {:.3} ms",
            self.inputs.median * 1e3,
            self.run.median * 1e3,
            self.logits.median * 1e3,
            self.sampling.median * 1e3
        )
    }
}

/// Human-readable bytes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]).unwrap();
        assert_eq!((s.median, s.p90, s.n), (6.0, 10.0, 11));
        assert!(Summary::of(&[]).is_none());
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn breakdown_summarises_each_part_and_the_step_per_step() {
        let t = |inputs, run, logits, sampling| StepTimes {
            inputs,
            run,
            logits,
            sampling,
        };
        // The step's median is the median of per-step sums (3, 12, 30), not the sum of the
        // parts' medians (1 + 10 + 2 = 13).
        let steps = [
            t(1.0, 1.0, 1.0, 5.0),
            t(1.0, 10.0, 1.0, 6.0),
            t(20.0, 10.0, 0.0, 7.0),
        ];
        let b = Breakdown::of(&steps).unwrap();
        assert_eq!(
            (
                b.inputs.median,
                b.run.median,
                b.logits.median,
                b.sampling.median
            ),
            (1.0, 10.0, 1.0, 6.0)
        );
        assert_eq!((b.step.median, b.step.n), (12.0, 3));
        assert_eq!(b.step.mean, (3.0 + 12.0 + 30.0) / 3.0);
        assert_eq!(steps[2].step(), 30.0);
        assert!(Breakdown::of(&[]).is_none());
        assert_eq!(
            Breakdown::of(&[t(1e-5, 8e-4, 2e-5, 1.5e-5)])
                .unwrap()
                .medians(),
            "inputs 0.010 ms, run 0.800 ms, logits 0.020 ms, sampling 0.015 ms"
        );
    }
}
