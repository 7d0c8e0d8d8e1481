//! Summaries of interleaved rounds, shared by the benches that alternate
//! Sluice and its raw baseline (a shared 2-core machine swings between
//! runs, so one round proves little).

/// The middle value (upper middle for an even count; 0 for none).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The lowest and the highest value ((0, 0) for none).
pub(crate) fn range(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

#[cfg(test)]
mod tests {
    use super::{median, range};

    #[test]
    fn median_and_range() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(range(&[0.9, 1.2, 0.7]), (0.7, 1.2));
        assert_eq!(range(&[]), (0.0, 0.0));
    }
}
