//! One tap is one trace: the webhook's incoming `traceparent` is continued
//! through the gateway, the event log, scenario, its calls to contacts and
//! delivery, delivery's queue and its call to LINE (line-sim records the
//! `traceparent` it got), and analytics' count update. Spans are exported
//! over OTLP to a receiver in this process. (Its own test binary: telemetry
//! installs the process-wide subscriber.)

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hibiki_line::signature::{SIGNATURE_HEADER, sign};
use hibiki_line_sim::storm::{EventKind, StormSpec, destination, event};
use hibiki_runtime::config::{LogFormat, TelemetryConfig};
use hibiki_runtime::telemetry;
use hibiki_testkit::HttpConnection;
use hibiki_testkit::otlp::{ReceivedSpan, Receiver};
use support::{CHANNEL, SECRET, mesh, user};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tap_is_one_trace_through_every_service_and_the_queues() {
    let receiver = Receiver::start().await;
    let guard = telemetry::init(&TelemetryConfig {
        service_name: "hibiki-e2e".into(),
        log_format: LogFormat::Json,
        log_filter: "warn".into(),
        otlp_endpoint: Some(receiver.url().to_owned()),
        sample_ratio: 1.0,
    })
    .expect("telemetry starts");
    let mesh = mesh().await;

    // One tap, from a caller that traces.
    let u = user(1);
    let token = mesh.sim.sim().lock().issue_reply_token(CHANNEL, &u);
    let spec = StormSpec {
        channel_id: CHANNEL.into(),
        postback_data: "action=join&campaign=spring".into(),
        ..StormSpec::default()
    };
    let body = serde_json::json!({
        "destination": destination(CHANNEL),
        "events": [event(&spec, EventKind::Postback, &u, &token)],
    })
    .to_string();
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let mut conn = HttpConnection::new(mesh.webhooks);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = conn
            .post(
                &format!("/line/webhook/{CHANNEL}"),
                &[
                    ("content-type", "application/json"),
                    (SIGNATURE_HEADER, &signature),
                    ("traceparent", &traceparent),
                ],
                body.clone().into_bytes(),
            )
            .await;
        if matches!(answer, Ok((200, _))) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway answered {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The chain runs to its end: menu, thank-you, and the live count.
    let sim = mesh.sim.sim().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = {
            let s = sim.lock();
            !s.menu_changes.is_empty() && !s.sent.is_empty()
        };
        let spans = receiver.spans();
        if done && spans.iter().any(|s| s.name == "analytics.count") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the chain did not finish: menu and message {done}, spans {:?}",
            spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // line-sim got the trace with each call.
    {
        let s = sim.lock();
        let menu = s.menu_changes[0].traceparent.clone().unwrap_or_default();
        assert!(menu.contains(TRACE), "the link carried {menu:?}");
        let sent = s.sent[0].traceparent.clone().unwrap_or_default();
        assert!(sent.contains(TRACE), "the reply carried {sent:?}");
    }
    // Flushes the batch exporter.
    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();

    let spans: Vec<ReceivedSpan> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE)
        .collect();
    let names: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "webhook",
        "scenario.event",
        "/hibiki.contacts.v1.ContactService/AddTags",
        "/hibiki.delivery.v1.DeliveryService/LinkRichMenu",
        "/hibiki.delivery.v1.DeliveryService/Send",
        "delivery.line_call",
        "analytics.count",
    ] {
        assert!(
            names.contains(want),
            "no {want} span in the trace: {names:?}"
        );
    }

    // Every span hangs off another span of the trace, or off the caller's.
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for s in &spans {
        assert!(
            s.parent_span_id == CALLER_SPAN || by_id.contains_key(s.parent_span_id.as_str()),
            "{} has parent {} outside the trace",
            s.name,
            s.parent_span_id
        );
    }
    let ancestors = |s: &ReceivedSpan| {
        let mut names = Vec::new();
        let mut at = s.parent_span_id.as_str();
        while let Some(p) = by_id.get(at) {
            names.push(p.name.clone());
            at = p.parent_span_id.as_str();
        }
        names
    };
    let one = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    // The webhook continues the caller; scenario continues the webhook
    // across the event log.
    assert_eq!(one("webhook").parent_span_id, CALLER_SPAN);
    assert!(ancestors(one("scenario.event")).contains(&"webhook".to_owned()));
    // contacts and delivery are called from scenario's span.
    for rpc in [
        "/hibiki.contacts.v1.ContactService/AddTags",
        "/hibiki.delivery.v1.DeliveryService/LinkRichMenu",
    ] {
        assert!(
            ancestors(one(rpc)).contains(&"scenario.event".to_owned()),
            "{rpc}: {:?}",
            ancestors(one(rpc))
        );
    }
    // Each call to LINE continues, across delivery's queue, the RPC that
    // queued it.
    for call in spans.iter().filter(|s| s.name == "delivery.line_call") {
        let up = ancestors(call);
        assert!(
            up.iter()
                .any(|n| n.starts_with("/hibiki.delivery.v1.DeliveryService/")),
            "a LINE call's ancestors: {up:?}"
        );
    }
    // analytics counts the change contacts made, in the same trace.
    let count = one("analytics.count");
    assert!(
        ancestors(count).contains(&"/hibiki.contacts.v1.ContactService/AddTags".to_owned()),
        "analytics.count's ancestors: {:?}",
        ancestors(count)
    );
}
