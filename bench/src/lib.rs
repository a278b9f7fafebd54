//! What hibiki's benchmarks share: latency recording and the figures they
//! print.
#![forbid(unsafe_code)]

use std::time::Duration;

/// Latencies of one run, in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    micros: Vec<u32>,
}

impl Latencies {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.micros
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Adds another run's latencies.
    pub fn merge(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    /// How many were recorded.
    pub fn count(&self) -> usize {
        self.micros.len()
    }

    /// The `q`-quantile (0 to 1), nearest rank.
    pub fn quantile(&mut self, q: f64) -> Duration {
        if self.micros.is_empty() {
            return Duration::ZERO;
        }
        self.micros.sort_unstable();
        let rank = ((q * self.micros.len() as f64).ceil() as usize).clamp(1, self.micros.len());
        Duration::from_micros(u64::from(self.micros[rank - 1]))
    }
}

/// Formats a duration as milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let mut l = Latencies::default();
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.quantile(0.5), Duration::from_micros(50));
        assert_eq!(l.quantile(0.99), Duration::from_micros(99));
        assert_eq!(l.quantile(1.0), Duration::from_micros(100));
    }
}
