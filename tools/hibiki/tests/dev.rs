//! `hibiki dev` brings up the whole mesh, each service SERVING on its own
//! port, and says exactly what is missing when a store is not there.

use std::process::Stdio;
use std::time::Duration;

use hibiki_testkit::{
    HttpConnection, RedisKeys, TestDatabase, free_port, free_port_run, random_id, wait_for_health,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic_health::ServingStatus;

const SERVICES: [&str; 6] = [
    "gateway",
    "contacts",
    "scenario",
    "delivery",
    "analytics",
    "admin-bff",
];

fn hibiki() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hibiki"));
    cmd.env("HIBIKI_LOG_FORMAT", "json")
        .env("HIBIKI_REDIS_PREFIX", format!("test-{}", random_id()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn dev_creates_its_database_and_runs_six_services_each_serving_on_its_own_port() {
    let database = TestDatabase::reserve();
    let grpc_base = free_port_run(6);
    let metrics_base = free_port_run(6);
    let http_port = free_port();
    let dashboard_port = free_port();
    let sim_port = free_port_run(2);
    // `hibiki trace collect` receives the mesh's spans.
    let otlp_port = free_port();
    let spans_file = std::env::temp_dir().join(format!("hibiki-dev-test-{}.spans", random_id()));
    let mut collector = hibiki()
        .args([
            "trace",
            "collect",
            "--listen",
            &format!("127.0.0.1:{otlp_port}"),
        ])
        .arg("--out")
        .arg(&spans_file)
        .spawn()
        .expect("hibiki trace collect starts");
    let mut collected = BufReader::new(collector.stdout.take().unwrap()).lines();
    let listening = collected.next_line().await.unwrap().unwrap_or_default();
    assert!(listening.contains("OTLP/gRPC on"), "{listening}");
    // The mesh's keys go when the test ends.
    let prefix = format!("test-{}", random_id());
    let _keys = RedisKeys::new("redis://127.0.0.1:6379", &prefix);
    let mut child = hibiki()
        .env("HIBIKI_REDIS_PREFIX", &prefix)
        .args(["dev", "--grpc-port", &grpc_base.to_string()])
        .args(["--line-sim-port", &sim_port.to_string()])
        .args(["--metrics-port", &metrics_base.to_string()])
        .args(["--http-port", &http_port.to_string()])
        .args(["--dashboard-port", &dashboard_port.to_string()])
        .env("HIBIKI_DATABASE_URL", database.url())
        .env(
            "HIBIKI_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{otlp_port}"),
        )
        .spawn()
        .expect("hibiki starts");

    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let done = line.contains("hibiki dev: ready");
            printed.push(line);
            if done {
                return;
            }
        }
    })
    .await;
    let printed = printed.join("\n");
    assert!(
        ready.is_ok(),
        "hibiki dev did not get ready; printed:\n{printed}"
    );

    assert!(database.exists().await, "hibiki dev creates its database");
    assert!(
        printed.contains("demo tenant \"demo\": channel 1000000001"),
        "the demo tenant is seeded:\n{printed}"
    );
    assert!(
        printed.contains(
            "demo scenarios (examples/): spring campaign, welcome sequence, opening hours reply"
        ),
        "the example scenarios are applied:\n{printed}"
    );
    for (i, name) in SERVICES.iter().enumerate() {
        let url = format!("http://127.0.0.1:{}", grpc_base + i as u16);
        assert!(
            printed.contains(&format!("{name:<10} {url}")),
            "{name} at {url} not printed:\n{printed}"
        );
        assert!(
            printed.contains(&format!("{name:<10} SERVING")),
            "{name} not SERVING:\n{printed}"
        );
        wait_for_health(&url, ServingStatus::Serving).await;
        let metrics = format!("127.0.0.1:{}/metrics", metrics_base + i as u16);
        assert!(
            printed.contains(&metrics),
            "{metrics} not printed:\n{printed}"
        );
    }

    // The dashboard is served, and its printed link signs in to the demo.
    let link = format!(
        "dashboard: http://127.0.0.1:{dashboard_port}/#tenant=demo&token=hibiki-dev-demo-operator-token"
    );
    assert!(printed.contains(&link), "{link} not printed:\n{printed}");
    let mut dash = HttpConnection::new(([127, 0, 0, 1], dashboard_port).into());
    let (status, text) = dash
        .post(
            "/api/session",
            &[("content-type", "application/json")],
            br#"{"tenant":"demo","token":"hibiki-dev-demo-operator-token"}"#.to_vec(),
        )
        .await
        .expect("the dashboard answers");
    assert_eq!(status, 204, "signing in to the demo: {text}");

    // The demo channel's webhooks are accepted: the gateway follows the
    // channel contacts registered.
    let webhooks = format!("http://127.0.0.1:{http_port}/line/webhook/{{channel_id}}");
    assert!(
        printed.contains(&webhooks),
        "{webhooks} not printed:\n{printed}"
    );
    let body = br#"{"destination":"Ubot","events":[{"type":"follow","mode":"active","timestamp":1767000000000,"webhookEventId":"01JDEVTEST0000000000000001","deliveryContext":{"isRedelivery":false},"source":{"type":"user","userId":"Udev"},"replyToken":"r","follow":{"isUnblocked":false}}]}"#;
    let signature = hibiki_gateway::line::sign(b"demo-channel-secret", body);
    let mut conn = HttpConnection::new(([127, 0, 0, 1], http_port).into());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = conn
            .post(
                "/line/webhook/1000000001",
                &[(hibiki_gateway::line::SIGNATURE_HEADER, &signature)],
                body.to_vec(),
            )
            .await
            .expect("the gateway answers");
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo channel's webhook got {status} {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // line-sim plays LINE for the demo channel, with the demo's rich menus,
    // and its storm of signed webhooks is accepted by the gateway.
    let api = format!("http://127.0.0.1:{sim_port}");
    let admin = format!("http://127.0.0.1:{}", sim_port + 1);
    assert!(
        printed.contains(&format!("line-sim: Messaging API {api}   admin {admin}")),
        "line-sim not printed:\n{printed}"
    );
    let http = reqwest::Client::new();
    let alias: serde_json::Value = http
        .get(format!("{api}/v2/bot/richmenu/alias/campaign"))
        .bearer_auth("demo-access-token")
        .send()
        .await
        .expect("line-sim answers")
        .json()
        .await
        .unwrap();
    assert!(
        alias["richMenuId"]
            .as_str()
            .unwrap()
            .starts_with("richmenu-"),
        "{alias}"
    );
    let storm: serde_json::Value = http
        .post(format!("{admin}/storms"))
        .json(&serde_json::json!({
            "url": format!("http://127.0.0.1:{http_port}/line/webhook/1000000001"),
            "channel_id": "1000000001",
            "users": 200,
            "rate": 1000.0,
            "kinds": ["follow", "text", "postback"],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = storm["storm_id"].as_u64().expect("a storm id");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report: serde_json::Value = http
            .get(format!("{admin}/storms/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if report["done"] == true {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the storm never ended: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report["sent"], 200, "{report}");
    assert_eq!(
        report["accepted"], 200,
        "every storm webhook is accepted: {report}"
    );

    // The taps went all the way: gateway, event log, scenario (the spring
    // campaign), contacts, delivery, line-sim. Every third storm user
    // tapped the campaign's postback and got the campaign menu, once.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let changes: serde_json::Value = http
            .get(format!("{admin}/ledger/rich-menus?limit=1000"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = changes["changes"].as_array().map_or(0, Vec::len);
        if n >= 66 {
            assert_eq!(n, 66, "each tapping user's menu switched once: {changes}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {n} of 66 menus switched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // delivery sends through line-sim: a push for the demo channel lands in
    // line-sim's ledger.
    let delivery = format!("http://127.0.0.1:{}", grpc_base + 3);
    let mut client =
        hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient::new(
            hibiki_testkit::authorized(&delivery, hibiki_runtime::config::DEV_SERVICE_TOKEN),
        );
    let job = client
        .send(hibiki_proto::delivery::v1::SendRequest {
            tenant_id: "demo".into(),
            channel_id: "1000000001".into(),
            idempotency_key: hibiki_testkit::random_id(),
            target: Some(hibiki_proto::delivery::v1::send_request::Target::PushTo(
                format!("U{:032x}", 1_000_042),
            )),
            messages_json: vec![r#"{"type":"text","text":"welcome"}"#.into()],
            ..Default::default()
        })
        .await
        .expect("delivery takes the push");
    assert!(!job.get_ref().job_id.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ledger: serde_json::Value = http
            .get(format!(
                "{admin}/ledger/messages?recipient=U{:032x}",
                1_000_042
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ledger["messages"].as_array().is_some_and(|m| m.len() == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the push never reached line-sim: {ledger}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `hibiki storm` runs the campaign storm against this mesh and checks
    // every friend: tag, menu, one message, and the live count.
    let storm = tokio::process::Command::new(env!("CARGO_BIN_EXE_hibiki"))
        .args(["storm", "--users", "150", "--rate", "300"])
        .args(["--gateway", &format!("http://127.0.0.1:{http_port}")])
        .args(["--line-sim-admin", &admin])
        .args(["--contacts", &format!("http://127.0.0.1:{}", grpc_base + 1)])
        .args([
            "--analytics",
            &format!("http://127.0.0.1:{}", grpc_base + 4),
        ])
        .output()
        .await
        .expect("hibiki storm runs");
    let out = String::from_utf8_lossy(&storm.stdout);
    let err = String::from_utf8_lossy(&storm.stderr);
    assert!(storm.status.success(), "hibiki storm failed:\n{out}\n{err}");
    assert!(
        out.contains("rich menus: 150 of 150 linked") && out.contains("webhook → link accepted"),
        "{out}"
    );
    assert!(
        out.contains("messages: 150 of 150 friends got one (0 got more than one)"),
        "{out}"
    );
    assert!(
        out.contains("every friend: tagged, switched, thanked once"),
        "{out}"
    );

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("hibiki dev stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");

    // hibiki dev flushed its spans as it stopped; the collector writes them
    // out when it stops, and the report says where the storm's time went.
    let pid = collector.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), collector.wait())
        .await
        .expect("hibiki trace collect stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut said = Vec::new();
    while let Some(line) = collected.next_line().await.unwrap() {
        said.push(line);
    }
    let said = said.join("\n");
    assert!(said.contains("spans written to"), "{said}");
    let report = hibiki()
        .args(["trace", "report", "--slowest", "2"])
        .arg(&spans_file)
        .output()
        .await
        .expect("hibiki trace report runs");
    let _ = std::fs::remove_file(&spans_file);
    let text = String::from_utf8_lossy(&report.stdout);
    let err = String::from_utf8_lossy(&report.stderr);
    assert!(report.status.success(), "{text}\n{err}");
    // Every stage of a tap, the queue hops between them, the slowest
    // traces' paths and the bottleneck.
    for stage in [
        "webhook",
        "queue webhook ⇢ scenario.event",
        "scenario.event",
        "contacts.AddTags",
        "delivery.LinkRichMenu",
        "delivery.LinkRichMenu ⇢ delivery.line_call",
        "analytics.count",
        "critical path of the 2 slowest traces",
        "top bottleneck: ",
    ] {
        assert!(text.contains(stage), "no {stage:?} in the report:\n{text}");
    }
}

#[tokio::test]
async fn dev_without_redis_names_it_where_it_looked_and_how_to_start_it() {
    let database = TestDatabase::reserve();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let output = hibiki()
        .args(["dev"])
        .env("HIBIKI_DATABASE_URL", database.url())
        .env("HIBIKI_REDIS_URL", &url)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("Redis is not reachable at {url}")),
        "{stderr}"
    );
    assert!(stderr.contains("redis-server --daemonize yes"), "{stderr}");
    assert!(!stderr.contains("PostgreSQL is not reachable"), "{stderr}");
}

#[tokio::test]
async fn dev_without_postgres_names_it_where_it_looked_and_how_to_start_it() {
    let port = free_port();
    let output = hibiki()
        .args(["dev"])
        .env(
            "HIBIKI_DATABASE_URL",
            format!("postgres://root@127.0.0.1:{port}/hibiki"),
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "PostgreSQL is not reachable at 127.0.0.1:{port}/hibiki"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("pg_ctlcluster"), "{stderr}");
}

#[tokio::test]
async fn dev_rejects_an_invalid_setting_by_name() {
    let output = hibiki()
        .args(["dev"])
        .env("HIBIKI_TRACE_SAMPLE_RATIO", "2")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("HIBIKI_TRACE_SAMPLE_RATIO"), "{stderr}");
}
