//! `hibiki_delivery_backlog`, the gauge KEDA scales delivery on: it shows
//! the calls waiting while LINE's rate limit holds them back, and falls to
//! zero once they are sent. Its own test binary, so that no other test's
//! delivery sets the same process-wide gauge.

use std::time::{Duration, Instant};

use hibiki_line::api::{Endpoint, Limit};
use hibiki_line_sim::SimConfig;
use hibiki_proto::delivery::v1::JobStatus;

mod common;
use common::*;

/// The gauge's value for `class`, as `/metrics` would show it.
fn backlog(class: &str) -> Option<f64> {
    let text = hibiki_runtime::metrics::recorder().render();
    let prefix = format!("hibiki_delivery_backlog{{class=\"{class}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a number"))
}

async fn until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_backlog_gauge_counts_the_calls_waiting_and_returns_to_zero() {
    // 50 pushes a second on both sides: 300 pushes wait about 6 s. They are
    // queued all at once, so the queue grows however slowly this machine
    // submits them.
    let mut sim = SimConfig::default();
    sim.limits.insert(Endpoint::Push, Limit::per_second(50));
    let mesh = Mesh::start(
        sim,
        &[
            ("HIBIKI_DELIVERY_LIMITS", "push=50/s"),
            ("HIBIKI_DELIVERY_COALESCE_MS", "0"),
        ],
    )
    .await
    .with_delivery()
    .await;
    let mut client = mesh.client();
    let mut queued = tokio::task::JoinSet::new();
    for n in 0..300 {
        let mut client = client.clone();
        queued.spawn(async move {
            client
                .send(push(
                    ACME,
                    ACME_CHANNEL,
                    &format!("b{n}"),
                    &user(n),
                    &format!("offer {n}"),
                ))
                .await
                .unwrap()
                .into_inner()
                .job_id
        });
    }
    let jobs = queued.join_all().await;
    until("a backlog is reported", Duration::from_secs(5), || {
        backlog("rt").is_some_and(|b| b >= 100.0)
    })
    .await;
    assert!(
        backlog("rt").unwrap() <= 300.0,
        "never more than was queued"
    );
    for job in &jobs {
        let done = finished(&mut client, ACME, job, Duration::from_secs(30)).await;
        assert_eq!(done.status(), JobStatus::Succeeded, "{job}");
    }
    until("the backlog falls to zero", Duration::from_secs(5), || {
        backlog("rt") == Some(0.0)
    })
    .await;
    assert_eq!(backlog("bulk"), Some(0.0), "no broadcast was queued");
}
