//! A sum of `f64` values that does not depend on the order they come in, so that an
//! aggregate over partitions merged in whatever order DataFusion's threads finish gives
//! the same bits every run (a run killed and run again reports exactly what an
//! uninterrupted one does). Each value is rounded once to a multiple of 2^-64 and the
//! multiples are summed exactly in an `i128`: integer addition is associative, so the
//! result depends on the set of values alone. The rounding (at most 2^-65 per value) is
//! far below the `f64` rounding of the final value for the sums it serves (log losses,
//! probabilities).

use datafusion::common::{exec_err, Result};

/// 2^64: values are summed as multiples of 2^-64.
const SCALE: f64 = 18_446_744_073_709_551_616.0;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactSum(i128);

impl ExactSum {
    /// Adds `x`; values of magnitude 2^62 or more (or not finite) are refused.
    pub fn add(&mut self, x: f64) -> Result<()> {
        if !x.is_finite() || x.abs() >= 4.611_686_018_427_388e18 {
            return exec_err!("exact sum: {x} is out of range");
        }
        self.0 = self.0.saturating_add((x * SCALE).round() as i128);
        Ok(())
    }

    pub fn merge(&mut self, other: Self) {
        self.0 = self.0.saturating_add(other.0);
    }

    pub fn value(self) -> f64 {
        self.0 as f64 / SCALE
    }

    /// The sums as bytes (16 little-endian bytes each), for an aggregate's state.
    pub fn to_bytes(sums: &[Self]) -> Vec<u8> {
        sums.iter().flat_map(|s| s.0.to_le_bytes()).collect()
    }

    /// The inverse of [`ExactSum::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Vec<Self>> {
        if !bytes.len().is_multiple_of(16) {
            return exec_err!("exact sum: a state of {} bytes", bytes.len());
        }
        Ok(bytes
            .chunks_exact(16)
            .map(|c| {
                let mut word = [0u8; 16];
                word.copy_from_slice(c);
                Self(i128::from_le_bytes(word))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_of_the_values_does_not_change_the_sum() {
        let values: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f64 / 997.0 + 1e-9 * i as f64)
            .collect();
        let sum = |order: &mut dyn Iterator<Item = &f64>| {
            let mut s = ExactSum::default();
            for v in order {
                s.add(*v).unwrap();
            }
            s
        };
        let forward = sum(&mut values.iter());
        let backward = sum(&mut values.iter().rev());
        assert_eq!(forward, backward);
        // Split and merged in either order: the same.
        let (mut a, mut b) = (
            sum(&mut values[..400].iter()),
            sum(&mut values[400..].iter()),
        );
        let a0 = a;
        a.merge(b);
        b.merge(a0);
        assert_eq!(a, forward);
        assert_eq!(b, forward);
        let plain: f64 = values.iter().sum();
        assert!((forward.value() - plain).abs() < 1e-12);
        assert_eq!(
            ExactSum::from_bytes(&ExactSum::to_bytes(&[forward, a])).unwrap(),
            vec![forward, a]
        );
        assert!(ExactSum::default().add(f64::NAN).is_err());
    }
}
