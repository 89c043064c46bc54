//! Latency samples and their summary.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile (as scripts/latency computes it): the smallest sample with at
/// least `p`% of the samples at or below it.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Summary {
            n: ms.len(),
            min: ms[0],
            p50: percentile(&ms, 50),
            p90: percentile(&ms, 90),
            p99: percentile(&ms, 99),
            max: ms[ms.len() - 1],
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples).expect("samples");
        assert_eq!((s.n, s.min, s.max), (100, 1.0, 100.0));
        assert_eq!((s.p50, s.p90, s.p99), (50.0, 90.0, 99.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        let one = Summary::of(&[Duration::from_millis(7)]).expect("one");
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        // Unsorted input; with 10 samples p99 is the largest.
        let ten: Vec<Duration> = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        let s = Summary::of(&ten).expect("ten");
        assert_eq!((s.p50, s.p90, s.p99), (5.0, 9.0, 10.0));
        assert!(Summary::of(&[]).is_none());
    }
}
