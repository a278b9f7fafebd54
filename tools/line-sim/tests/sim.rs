//! line-sim behaves as `../shared/LINE.md` says LINE does: bearer tokens,
//! validation with LINE's error body, the 5-message and 500-recipient
//! limits, retry keys (409 with the accepted request id, 400 where LINE
//! takes none), per-channel per-endpoint rate limits (429, nothing
//! processed, no Retry-After), injected faults, and a ledger of what it
//! accepted. Everything over real HTTP on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hibiki_line::api::{
    ACCEPTED_REQUEST_ID_HEADER, Endpoint, Limit, QUOTA_EXHAUSTED, RATE_LIMITED, REQUEST_ID_HEADER,
    RETRY_KEY_HEADER,
};
use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use serde_json::{Value, json};

const TOKEN: &str = "token-a";
const TOKEN_B: &str = "token-b";
const KEY: &str = "123e4567-e89b-12d3-a456-426614174000";

fn user(n: u64) -> String {
    format!("U{n:032x}")
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start(config: SimConfig) -> LineSim {
    let mut config = config;
    config.channels = vec![
        SimChannel {
            channel_id: "1000000001".into(),
            access_token: TOKEN.into(),
            secret: "secret-a".into(),
        },
        SimChannel {
            channel_id: "1000000002".into(),
            access_token: TOKEN_B.into(),
            secret: "secret-b".into(),
        },
    ];
    LineSim::start(config, loopback(), loopback())
        .await
        .expect("line-sim starts")
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn call(
    sim: &LineSim,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", sim.api_url()));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.expect("line-sim answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(sim: &LineSim, path: &str, headers: &[(&str, &str)], body: Value) -> Answer {
    call(
        sim,
        reqwest::Method::POST,
        path,
        Some(TOKEN),
        headers,
        Some(body),
    )
    .await
}

async fn admin(sim: &LineSim, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut r = reqwest::Client::new().request(method, format!("{}{path}", sim.admin_url()));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let response = r.send().await.expect("the admin API answers");
    assert!(
        response.status().is_success(),
        "admin {path}: {}",
        response.status()
    );
    response.json().await.unwrap_or(Value::Null)
}

async fn ledger(sim: &LineSim) -> Vec<Value> {
    admin(
        sim,
        reqwest::Method::GET,
        "/ledger/messages?limit=100000",
        None,
    )
    .await["messages"]
        .as_array()
        .unwrap()
        .clone()
}

fn text(t: &str) -> Value {
    json!({"type": "text", "text": t})
}

fn properties(a: &Answer) -> Vec<String> {
    a.body["details"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|x| x["property"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_need_a_channel_token_and_every_answer_has_a_request_id() {
    let sim = start(SimConfig::default()).await;
    let body = json!({"to": user(1), "messages": [text("hi")]});
    for token in [None, Some("nope")] {
        let a = call(
            &sim,
            reqwest::Method::POST,
            "/v2/bot/message/push",
            token,
            &[],
            Some(body.clone()),
        )
        .await;
        assert_eq!(a.status, 401);
        assert!(a.body["message"].as_str().unwrap().contains("access token"));
        assert!(a.headers.contains_key(REQUEST_ID_HEADER));
    }
    let a = post(&sim, "/v2/bot/message/push", &[], body).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["sentMessages"].as_array().unwrap().len(), 1);
    let unknown = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/nothing",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.headers.contains_key(REQUEST_ID_HEADER));
    // Only the accepted push is in the ledger.
    let sent = ledger(&sim).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["recipient"], user(1));
    assert_eq!(sent[0]["endpoint"], "push");
}

#[tokio::test]
async fn bad_requests_get_lines_error_body_naming_each_property() {
    let sim = start(SimConfig::default()).await;
    let a = post(&sim, "/v2/bot/message/push", &[], json!({"messages": []})).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["message"], "The request body has 2 error(s)");
    assert_eq!(properties(&a), ["to", "messages"]);

    let six: Vec<Value> = (0..6).map(|i| text(&i.to_string())).collect();
    let a = post(
        &sim,
        "/v2/bot/message/push",
        &[],
        json!({"to": user(1), "messages": six}),
    )
    .await;
    assert_eq!(
        (a.status, properties(&a)),
        (400, vec!["messages".to_owned()])
    );

    let a = post(
        &sim,
        "/v2/bot/message/push",
        &[],
        json!({"to": "someone", "messages": [{"type": "text", "text": ""}]}),
    )
    .await;
    assert_eq!(properties(&a), ["to", "messages[0].text"]);

    let many: Vec<String> = (0..501).map(user).collect();
    let a = post(
        &sim,
        "/v2/bot/message/multicast",
        &[],
        json!({"to": many, "messages": [text("hi")]}),
    )
    .await;
    assert_eq!((a.status, properties(&a)), (400, vec!["to".to_owned()]));

    let a = call(
        &sim,
        reqwest::Method::POST,
        "/v2/bot/message/push",
        Some(TOKEN),
        &[("content-type", "application/json")],
        None,
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert!(ledger(&sim).await.is_empty(), "nothing invalid was sent");

    // 500 recipients is LINE's limit, not over it: one entry each.
    let five_hundred: Vec<String> = (0..500).map(user).collect();
    let a = post(
        &sim,
        "/v2/bot/message/multicast",
        &[],
        json!({"to": five_hundred, "messages": [text("hi")]}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(ledger(&sim).await.len(), 500);
}

#[tokio::test]
async fn a_repeated_retry_key_answers_409_with_the_accepted_request_and_sends_nothing() {
    let sim = start(SimConfig::default()).await;
    let body = json!({"to": user(1), "messages": [text("once")]});
    let first = post(
        &sim,
        "/v2/bot/message/push",
        &[(RETRY_KEY_HEADER, KEY)],
        body.clone(),
    )
    .await;
    assert_eq!(first.status, 200);
    let again = post(
        &sim,
        "/v2/bot/message/push",
        &[(RETRY_KEY_HEADER, KEY)],
        body.clone(),
    )
    .await;
    assert_eq!(again.status, 409);
    assert_eq!(
        again.headers[ACCEPTED_REQUEST_ID_HEADER],
        first.headers[REQUEST_ID_HEADER]
    );
    assert_ne!(
        again.headers[REQUEST_ID_HEADER],
        first.headers[REQUEST_ID_HEADER]
    );
    assert_eq!(again.body["sentMessages"], first.body["sentMessages"]);
    // Keys are per channel: the other channel's same key is a new request.
    let other = call(
        &sim,
        reqwest::Method::POST,
        "/v2/bot/message/push",
        Some(TOKEN_B),
        &[(RETRY_KEY_HEADER, KEY)],
        Some(body.clone()),
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(ledger(&sim).await.len(), 2);

    // Endpoints that take no retry key answer 400 to one; so does a key
    // that is not a UUID.
    let token = admin(
        &sim,
        reqwest::Method::POST,
        "/reply-tokens",
        Some(json!({"channel_id": "1000000001", "user_id": user(2)})),
    )
    .await["replyToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let reply = post(
        &sim,
        "/v2/bot/message/reply",
        &[(RETRY_KEY_HEADER, KEY)],
        json!({"replyToken": token, "messages": [text("hi")]}),
    )
    .await;
    assert_eq!(reply.status, 400);
    let bulk = post(
        &sim,
        "/v2/bot/richmenu/bulk/unlink",
        &[(RETRY_KEY_HEADER, KEY)],
        json!({"userIds": [user(2)]}),
    )
    .await;
    assert_eq!(bulk.status, 400);
    let bad = post(
        &sim,
        "/v2/bot/message/push",
        &[(RETRY_KEY_HEADER, "abc")],
        body,
    )
    .await;
    assert_eq!(bad.status, 400);
    // A failed request does not spend its key: a valid retry goes through.
    let invalid = post(
        &sim,
        "/v2/bot/message/multicast",
        &[(RETRY_KEY_HEADER, "223e4567-e89b-12d3-a456-426614174000")],
        json!({"to": [], "messages": [text("x")]}),
    )
    .await;
    assert_eq!(invalid.status, 400);
    let valid = post(
        &sim,
        "/v2/bot/message/multicast",
        &[(RETRY_KEY_HEADER, "223e4567-e89b-12d3-a456-426614174000")],
        json!({"to": [user(3)], "messages": [text("x")]}),
    )
    .await;
    assert_eq!(valid.status, 200);
}

#[tokio::test]
async fn over_the_rate_limit_answers_429_without_retry_after_and_processes_nothing() {
    let mut config = SimConfig::default();
    config.limits.insert(Endpoint::Push, Limit::per_second(5));
    let sim = start(config).await;
    let mut statuses = Vec::new();
    for n in 0..8 {
        let a = post(
            &sim,
            "/v2/bot/message/push",
            &[],
            json!({"to": user(n), "messages": [text("hi")]}),
        )
        .await;
        if a.status == 429 {
            assert_eq!(a.body["message"], RATE_LIMITED);
            assert!(!a.headers.contains_key("retry-after"));
        }
        statuses.push(a.status);
    }
    // Five a second with a burst of five: the first five pass at once, the
    // rest of this instant is refused (a refill may let one more through).
    assert_eq!(&statuses[..5], [200; 5]);
    assert!(statuses[5..].contains(&429));
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ledger(&sim).await.len(), accepted);
    // Limits are per endpoint and per channel.
    let multicast = post(
        &sim,
        "/v2/bot/message/multicast",
        &[],
        json!({"to": [user(1)], "messages": [text("hi")]}),
    )
    .await;
    assert_eq!(multicast.status, 200);
    let other = call(
        &sim,
        reqwest::Method::POST,
        "/v2/bot/message/push",
        Some(TOKEN_B),
        &[],
        Some(json!({"to": user(1), "messages": [text("hi")]})),
    )
    .await;
    assert_eq!(other.status, 200);
    // The bucket refills at the limit's rate.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = post(
            &sim,
            "/v2/bot/message/push",
            &[],
            json!({"to": user(9), "messages": [text("hi")]}),
        )
        .await;
        if a.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the limit never refilled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = admin(&sim, reqwest::Method::GET, "/stats", None).await;
    assert!(stats["requests"]["push"]["429"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn faults_fail_requests_before_or_after_line_processed_them() {
    let sim = start(SimConfig::default()).await;
    let push = |n: u64| json!({"to": user(n), "messages": [text("hi")]});

    // Every request fails before it is processed: nothing sent.
    let f = json!({"error_rate": 1.0, "processed_rate": 0.0});
    admin(&sim, reqwest::Method::PUT, "/faults", Some(f)).await;
    let a = post(
        &sim,
        "/v2/bot/message/push",
        &[(RETRY_KEY_HEADER, KEY)],
        push(1),
    )
    .await;
    assert!(a.status == 500 || a.status == 503, "{}", a.status);
    assert!(ledger(&sim).await.is_empty());

    // Every request is processed, then its answer is lost: the retry with
    // the same key is a 409, and the message was sent once.
    let f = json!({"error_rate": 1.0, "processed_rate": 1.0});
    admin(&sim, reqwest::Method::PUT, "/faults", Some(f)).await;
    let a = post(
        &sim,
        "/v2/bot/message/push",
        &[(RETRY_KEY_HEADER, KEY)],
        push(1),
    )
    .await;
    assert!(a.status >= 500);
    admin(&sim, reqwest::Method::DELETE, "/faults", None).await;
    let a = post(
        &sim,
        "/v2/bot/message/push",
        &[(RETRY_KEY_HEADER, KEY)],
        push(1),
    )
    .await;
    assert_eq!(a.status, 409);
    assert_eq!(ledger(&sim).await.len(), 1);

    // Faults can be limited to some endpoints.
    let f = json!({"error_rate": 1.0, "endpoints": ["multicast"]});
    admin(&sim, reqwest::Method::PUT, "/faults", Some(f)).await;
    assert_eq!(
        post(&sim, "/v2/bot/message/push", &[], push(2))
            .await
            .status,
        200
    );

    // A timeout: no answer at all within the caller's patience.
    let f = json!({"timeout_rate": 1.0, "processed_rate": 0.0});
    admin(&sim, reqwest::Method::PUT, "/faults", Some(f)).await;
    let outcome = reqwest::Client::new()
        .post(format!("{}/v2/bot/message/push", sim.api_url()))
        .bearer_auth(TOKEN)
        .json(&push(3))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(outcome.is_err_and(|e| e.is_timeout()));

    // Latency is added to every answer.
    let f = json!({"latency_min_ms": 150, "latency_max_ms": 200});
    admin(&sim, reqwest::Method::PUT, "/faults", Some(f)).await;
    let started = Instant::now();
    assert_eq!(
        post(&sim, "/v2/bot/message/push", &[], push(4))
            .await
            .status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    admin(&sim, reqwest::Method::DELETE, "/faults", None).await;

    // A 429 burst refuses everything while it lasts.
    admin(
        &sim,
        reqwest::Method::POST,
        "/throttle",
        Some(json!({"for_ms": 60_000})),
    )
    .await;
    let a = post(&sim, "/v2/bot/message/push", &[], push(5)).await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (429, Some(RATE_LIMITED))
    );
    admin(&sim, reqwest::Method::POST, "/reset", None).await;
    assert_eq!(
        post(&sim, "/v2/bot/message/push", &[], push(5))
            .await
            .status,
        200
    );

    // Bad fault settings are refused with the field named.
    let bad = reqwest::Client::new()
        .put(format!("{}/faults", sim.admin_url()))
        .json(&json!({"error_rate": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("error_rate"));
}

#[tokio::test]
async fn rich_menus_are_created_aliased_linked_in_bulk_and_unlinked() {
    let sim = start(SimConfig::default()).await;
    let menu = post(
        &sim,
        "/v2/bot/richmenu",
        &[],
        json!({"size": {"width": 2500, "height": 843}, "selected": false, "name": "campaign",
               "chatBarText": "Tap", "areas": []}),
    )
    .await;
    assert_eq!(menu.status, 200);
    let id = menu.body["richMenuId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("richmenu-"));
    let missing = post(&sim, "/v2/bot/richmenu", &[], json!({"name": "x"})).await;
    assert_eq!(missing.status, 400);
    assert!(properties(&missing).contains(&"size".to_owned()));
    let listed = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/richmenu/list",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(listed.body["richmenus"][0]["richMenuId"], id);

    // Aliases.
    let a = post(
        &sim,
        "/v2/bot/richmenu/alias",
        &[],
        json!({"richMenuAliasId": "campaign", "richMenuId": id}),
    )
    .await;
    assert_eq!(a.status, 200);
    let dup = post(
        &sim,
        "/v2/bot/richmenu/alias",
        &[],
        json!({"richMenuAliasId": "campaign", "richMenuId": id}),
    )
    .await;
    assert_eq!(dup.status, 400);
    let got = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/richmenu/alias/campaign",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(got.body["richMenuId"], id);
    let list = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/richmenu/alias/list",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(list.body["aliases"].as_array().unwrap().len(), 1);

    // One link, a bulk link of three, an unlink.
    let one = post(
        &sim,
        &format!("/v2/bot/user/{}/richmenu/{id}", user(1)),
        &[],
        json!(null),
    )
    .await;
    assert_eq!(one.status, 200);
    let bulk = post(
        &sim,
        "/v2/bot/richmenu/bulk/link",
        &[],
        json!({"richMenuId": id, "userIds": [user(2), user(3), user(4)]}),
    )
    .await;
    assert_eq!(bulk.status, 202);
    let unknown = post(
        &sim,
        "/v2/bot/richmenu/bulk/link",
        &[],
        json!({"richMenuId": "richmenu-nope", "userIds": [user(5)]}),
    )
    .await;
    assert_eq!(unknown.status, 400);
    let too_many: Vec<String> = (0..501).map(user).collect();
    let over = post(
        &sim,
        "/v2/bot/richmenu/bulk/link",
        &[],
        json!({"richMenuId": id, "userIds": too_many}),
    )
    .await;
    assert_eq!(
        (over.status, properties(&over)),
        (400, vec!["userIds".to_owned()])
    );
    let unlink = call(
        &sim,
        reqwest::Method::DELETE,
        &format!("/v2/bot/user/{}/richmenu", user(3)),
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(unlink.status, 200);

    for (u, expected) in [
        (1, json!(id)),
        (2, json!(id)),
        (3, Value::Null),
        (5, Value::Null),
    ] {
        let current = admin(
            &sim,
            reqwest::Method::GET,
            &format!("/rich-menus/1000000001/users/{}", user(u)),
            None,
        )
        .await;
        assert_eq!(current["richMenuId"], expected, "user {u}");
    }
    let changes = admin(&sim, reqwest::Method::GET, "/ledger/rich-menus", None).await;
    let endpoints: Vec<&str> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        endpoints,
        [
            "link_rich_menu",
            "bulk_link_rich_menu",
            "bulk_link_rich_menu",
            "bulk_link_rich_menu",
            "unlink_rich_menu"
        ]
    );
    // Another channel sees none of this channel's menus.
    let other = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/richmenu/list",
        Some(TOKEN_B),
        &[],
        None,
    )
    .await;
    assert_eq!(other.body["richmenus"], json!([]));
}

#[tokio::test]
async fn replies_use_a_reply_token_once_and_other_endpoints_answer_as_line() {
    let mut config = SimConfig {
        monthly_quota: Some(2),
        ..SimConfig::default()
    };
    config
        .limits
        .insert(Endpoint::Broadcast, Limit::per_hour(60));
    let sim = start(config).await;
    let token = admin(
        &sim,
        reqwest::Method::POST,
        "/reply-tokens",
        Some(json!({"channel_id": "1000000001", "user_id": user(7)})),
    )
    .await["replyToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let reply = json!({"replyToken": token, "messages": [text("thanks")]});
    let a = post(
        &sim,
        "/v2/bot/message/reply",
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )],
        reply.clone(),
    )
    .await;
    assert_eq!(a.status, 200);
    let again = post(&sim, "/v2/bot/message/reply", &[], reply).await;
    assert_eq!(
        (again.status, again.body["message"].as_str()),
        (400, Some("Invalid reply token"))
    );
    let sent = ledger(&sim).await;
    assert_eq!(sent[0]["recipient"], user(7));
    assert_eq!(sent[0]["endpoint"], "reply");
    assert_eq!(
        sent[0]["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );

    // The monthly quota: two pushes, then 429 with the quota message.
    for n in 0..2 {
        let a = post(
            &sim,
            "/v2/bot/message/push",
            &[],
            json!({"to": user(n), "messages": [text("hi")]}),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    let over = post(
        &sim,
        "/v2/bot/message/push",
        &[],
        json!({"to": user(3), "messages": [text("hi")]}),
    )
    .await;
    assert_eq!(
        (over.status, over.body["message"].as_str()),
        (429, Some(QUOTA_EXHAUSTED))
    );
    let quota = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/message/quota",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(quota.body, json!({"type": "limited", "value": 2}));
    let used = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/message/quota/consumption",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(used.body["totalUsage"], 2);

    // Broadcast, narrowcast (202, then its progress), profile.
    let b = post(
        &sim,
        "/v2/bot/message/broadcast",
        &[],
        json!({"messages": [text("all")]}),
    )
    .await;
    assert_eq!(b.status, 200);
    let n = post(
        &sim,
        "/v2/bot/message/narrowcast",
        &[],
        json!({"messages": [text("some")]}),
    )
    .await;
    assert_eq!(n.status, 202);
    let request_id = n.headers[REQUEST_ID_HEADER].to_str().unwrap().to_owned();
    let progress = call(
        &sim,
        reqwest::Method::GET,
        &format!("/v2/bot/message/progress/narrowcast?requestId={request_id}"),
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(progress.body["phase"], "succeeded");
    let profile = call(
        &sim,
        reqwest::Method::GET,
        &format!("/v2/bot/profile/{}", user(7)),
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(profile.body["userId"], user(7));
    let nobody = call(
        &sim,
        reqwest::Method::GET,
        "/v2/bot/profile/x",
        Some(TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(nobody.status, 404);
}
