//! Small measuring helpers shared by `moemesh demo` and the bench tools.

use std::time::Duration;

use rand::Rng;

/// `tokens` rows of `hidden` values, uniform in ±1.7 (about unit variance).
pub fn random_hidden(rng: &mut impl Rng, tokens: usize, hidden: usize) -> Vec<f32> {
    (0..tokens * hidden)
        .map(|_| rng.random_range(-1.7f32..1.7))
        .collect()
}

/// The value below which `fraction` of `sorted` lies (nearest rank).
pub fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// `|got - want| / |want|` in the L2 norm, computed in f64.
pub fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_l2_measures_the_difference() {
        assert_eq!(relative_l2(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((relative_l2(&[3.0, 4.5], &[3.0, 4.0]) - 0.1).abs() < 1e-12);
        assert!(relative_l2(&[1.0], &[1.0, 2.0]).is_infinite());
    }

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&sorted, 1.0), Duration::from_millis(100));
    }
}
