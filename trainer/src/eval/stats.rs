//! The few statistics the reports need: binomial tails, the exact McNemar test for paired
//! right/wrong outcomes (does a later turn differ from turn 0 on the same questions?), and the
//! Wilson score interval for an accuracy.

/// P(X >= k) for X ~ Binomial(n, p): how likely a guesser right with probability `p` scores at
/// least `k` of `n`.
pub fn binomial_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    // ln C(n, i) for i = k.. from ln C(n, k), one ratio per step: O(n)
    let mut ln_choose: f64 = (1..=k)
        .map(|j| ((n - k + j) as f64).ln() - (j as f64).ln())
        .sum();
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut total = 0.0;
    for i in k..=n {
        total += (ln_choose + i as f64 * lp + (n - i) as f64 * lq).exp();
        if i < n {
            ln_choose += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
        }
    }
    total.min(1.0)
}

/// Two-sided exact McNemar p-value for `b` pairs that went one way (wrong -> right) and `c` the
/// other (right -> wrong): under "no difference" each discordant pair goes either way with
/// probability 1/2. 1 when there are no discordant pairs.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    // (a p below f64's range, 0 vs >= 1075, is its smallest normal value, not an exact 0)
    (2.0 * binomial_tail(n, b.max(c), 0.5)).clamp(f64::MIN_POSITIVE, 1.0)
}

/// The Wilson score interval of `k` successes in `n` at 95 % (z = 1.96); (0, 1) when n is 0.
pub fn wilson95(k: u64, n: u64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let z = 1.959_963_984_540_054_f64;
    let (nf, p) = (n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / nf;
    let center = (p + z * z / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / denom;
    // (exactly 0 and 1 at the ends: rounding leaves 5.6e-17 for 0 of 3)
    let lower = if k == 0 {
        0.0
    } else {
        (center - half).max(0.0)
    };
    let upper = if k == n {
        1.0
    } else {
        (center + half).min(1.0)
    };
    [lower, upper]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from scipy.stats: binom.sf(k - 1, n, p), and statsmodels' mcnemar(exact=True) /
    /// proportion_confint(method="wilson").
    #[test]
    fn known_values() {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-300);
        assert!(close(binomial_tail(10, 8, 0.5), 56.0 / 1024.0));
        assert!(close(binomial_tail(20, 0, 0.3), 1.0));
        assert_eq!(binomial_tail(5, 6, 0.5), 0.0);
        // 2 x P(X >= 3), X ~ Bin(5, 1/2) = 2 x 16/32: no evidence either way
        assert!(close(mcnemar_exact(3, 2), 1.0));
        assert!(close(mcnemar_exact(10, 0), 2.0 / 1024.0));
        assert!(close(mcnemar_exact(1, 9), 2.0 * 11.0 / 1024.0));
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        let [lo, hi] = wilson95(8, 10);
        assert!(
            (lo - 0.490_162).abs() < 1e-6 && (hi - 0.943_317).abs() < 1e-6,
            "{lo} {hi}"
        );
        let [lo, hi] = wilson95(0, 20);
        assert!(lo == 0.0 && (hi - 0.161_125).abs() < 1e-6, "{hi}");
        // exactly 0 and 1 at the ends (rounding left 5.6e-17 for 0 of 3)
        assert_eq!((wilson95(0, 3)[0], wilson95(3, 3)[1]), (0.0, 1.0));
        // large n stays finite and O(n)
        let p = mcnemar_exact(5200, 4800);
        assert!(p > 0.0 && p < 1e-4, "{p}");
    }
}
