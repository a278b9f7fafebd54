//! Quick retries in place, for a call that failed for a moment (a peer
//! shedding load, a connection pool exhausted for a second under a storm),
//! where the slow way back (a lease running out, a queue's delayed retry)
//! costs far more than a second. Each pause is jittered by ±50 % so that a
//! storm's failures do not come back in step.

use std::future::Future;
use std::time::Duration;

/// The pauses before each retry.
pub const QUICK: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1_000),
];

/// Runs `attempt` until it succeeds, fails for good (`transient` says which
/// errors are worth a retry), or has failed transiently after every pause
/// of [`QUICK`]. Each retry counts once in the counter `metric`.
pub async fn quickly<T, E, F, Fut>(
    metric: &'static str,
    transient: fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    for pause in QUICK {
        match attempt().await {
            Err(e) if transient(&e) => {
                tracing::debug!(error = %e, "transient failure; retrying");
                metrics::counter!(metric).increment(1);
                let jitter = rand::random_range(0.5..1.5);
                tokio::time::sleep(pause.mul_f64(jitter)).await;
            }
            other => return other,
        }
    }
    attempt().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `Err(true)` is transient, `Err(false)` is not.
    fn transient(e: &bool) -> bool {
        *e
    }

    /// Fails with `failures` (last first), then succeeds; counts attempts.
    async fn attempts(failures: Vec<bool>) -> (Result<u8, bool>, usize) {
        let calls = AtomicUsize::new(0);
        let failures = Mutex::new(failures);
        let result = quickly("test_quick_retries_total", transient, || {
            calls.fetch_add(1, Ordering::SeqCst);
            let next = failures.lock().unwrap().pop();
            async move {
                match next {
                    Some(e) => Err(e),
                    None => Ok(7),
                }
            }
        })
        .await;
        (result, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_in_place() {
        assert_eq!(attempts(vec![true, true]).await, (Ok(7), 3));
    }

    #[tokio::test]
    async fn a_permanent_failure_is_not_retried() {
        assert_eq!(attempts(vec![false]).await, (Err(false), 1));
    }

    #[tokio::test]
    async fn quick_retries_give_up_after_the_last_pause() {
        assert_eq!(attempts(vec![true; 10]).await, (Err(true), QUICK.len() + 1));
    }
}
