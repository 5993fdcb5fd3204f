//! Median and spread of a set of samples.

/// Nearest-rank p10 / median / p90 of a set of samples; in `report.json`
/// as `{"n", "p10", "p50", "p90"}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Spread {
    /// Samples.
    pub n: usize,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
}

impl Spread {
    /// The spread of `samples` (all zero for none).
    pub fn of(samples: &[f64]) -> Self {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if s.is_empty() {
            return Self::default();
        }
        s.sort_by(f64::total_cmp);
        let rank = |p: usize| s[(s.len() * p).div_ceil(100).saturating_sub(1)];
        Self {
            n: s.len(),
            p10: rank(10),
            p50: rank(50),
            p90: rank(90),
        }
    }

    /// Every figure multiplied by `k` (unit conversion).
    pub fn scaled(self, k: f64) -> Self {
        Self {
            n: self.n,
            p10: self.p10 * k,
            p50: self.p50 * k,
            p90: self.p90 * k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = Spread::of(&v);
        assert_eq!((s.n, s.p10, s.p50, s.p90), (100, 10.0, 50.0, 90.0));
        assert_eq!(Spread::of(&[]), Spread::default());
        assert_eq!(Spread::of(&[3.0]).p90, 3.0);
    }
}
