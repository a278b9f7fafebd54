//! What hibiki's benchmarks share: latency recording and the figures they
//! print.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Open-loop pacing with microsecond precision, as wrk2 does it.
///
/// One thread hands out request slots, `1 / rate` apart, to `senders`
/// queues in turn until `until`; each slot carries its scheduled instant,
/// and a sender measures latency from it, so a sender that falls behind
/// (its previous answer was late) counts the queueing it suffered.
/// tokio's own timers fire on millisecond ticks, which bunches a paced load
/// into bursts at each tick and adds up to a millisecond of timer delay to
/// every latency; this thread sleeps with the OS's fine-grained timer
/// instead, and hands out every slot that fell due while it slept.
pub fn pace(rate: f64, senders: usize, until: Instant) -> Vec<mpsc::UnboundedReceiver<Instant>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..senders.max(1))
        .map(|_| mpsc::unbounded_channel())
        .unzip();
    let period = Duration::from_secs_f64(1.0 / rate);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut slot: u64 = 0;
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            loop {
                let due = start + period.mul_f64(slot as f64);
                if due > now {
                    std::thread::sleep(due - now);
                    break;
                }
                if txs[(slot % txs.len() as u64) as usize].send(due).is_err() {
                    return;
                }
                slot += 1;
            }
        }
    });
    rxs
}

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

/// Does what PostgreSQL's autovacuum does, for servers that have it off
/// (this machine's has): `VACUUM (ANALYZE)` of the database at `url` every
/// `every`, until the task is dropped or aborted.
///
/// Without it, a benchmark's tables fill with dead rows and its query plans
/// are chosen on the statistics of empty tables, and the figures measure a
/// server no operator runs. Production servers keep autovacuum on (hibiki's
/// services warn at start-up when it is off).
pub fn autovacuum(url: &str, every: Duration) -> tokio::task::JoinHandle<()> {
    let url = url.to_owned();
    tokio::spawn(async move {
        use sqlx::Connection;
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match sqlx::PgConnection::connect(&url).await {
                Ok(mut conn) => {
                    if let Err(e) = sqlx::query("VACUUM (ANALYZE)").execute(&mut conn).await {
                        eprintln!("autovacuum stand-in: {e}");
                    }
                }
                Err(e) => eprintln!("autovacuum stand-in: {e}"),
            }
        }
    })
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
