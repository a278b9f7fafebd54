//! delivery against the real contacts, Redis, PostgreSQL and line-sim
//! playing LINE (faults included), over real gRPC and HTTP on loopback.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hibiki_delivery::keys;
use hibiki_line::api::{Endpoint, Limit};
use hibiki_line_sim::{Faults, SimChannel, SimConfig};
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{
    BroadcastRequest, DeliveryOutcome, DeliveryOutcomeRecord, GetJobRequest, JobStatus,
    LinkRichMenuRequest, ListDeadLettersRequest, Recipients, ReplayDeadLettersRequest, SendRequest,
    UnlinkRichMenuRequest, link_rich_menu_request, send_request,
};
use hibiki_testkit::{
    SERVICE_TOKEN, ServiceProcess, authorized, lifecycle, operator_token, wait_for_health,
};
use tonic_health::ServingStatus;

mod common;
use common::*;

#[tokio::test]
async fn a_push_is_sent_once_with_its_retry_key_and_a_repeat_returns_the_same_job() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    let mut client = mesh.client();
    let request = push(ACME, ACME_CHANNEL, "run:1:step:1", &user(1), "thanks");
    let job = client.send(request.clone()).await.unwrap().into_inner();
    assert_eq!(job.recipients_total, 1);
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
    assert_eq!(done.status(), JobStatus::Succeeded);
    assert_eq!(done.recipients_succeeded, 1);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.line_request_ids.len(), 1);

    let again = client.send(request).await.unwrap().into_inner();
    assert_eq!(again.job_id, job.job_id, "the idempotency key has its job");
    // The outcome went out for analytics, with the call's trace.
    let key = format!("{}:delivery:outcomes", mesh.env["HIBIKI_REDIS_PREFIX"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcomes = loop {
        let found = hibiki_testkit::stream_fields(&mesh.env["HIBIKI_REDIS_URL"], &key, "o").await;
        if !found.is_empty() || Instant::now() >= deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outcomes: Vec<DeliveryOutcomeRecord> = outcomes
        .iter()
        .map(|b| prost::Message::decode(b.as_slice()).unwrap())
        .collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0].job_id, job.job_id);
    assert_eq!(outcomes[0].tenant_id, ACME);
    assert_eq!(outcomes[0].endpoint, "push");
    assert_eq!(outcomes[0].outcome(), DeliveryOutcome::Accepted);
    assert_eq!(outcomes[0].recipients, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = mesh.sent();
    assert_eq!(sent.len(), 1, "sent once: {sent:?}");
    assert_eq!(sent[0].recipient, user(1));
    assert_eq!(
        sent[0].retry_key.as_deref(),
        Some(keys::retry_key(ACME, ACME_CHANNEL, "run:1:step:1").as_str())
    );
    assert_eq!(sent[0].request_id, done.line_request_ids[0]);

    // A multicast and a reply go out too.
    let multicast = client
        .send(SendRequest {
            tenant_id: ACME.into(),
            channel_id: ACME_CHANNEL.into(),
            idempotency_key: "m".into(),
            target: Some(send_request::Target::MulticastTo(Recipients {
                user_ids: vec![user(2), user(3)],
            })),
            messages_json: vec![text("news")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = mesh
        .sim
        .sim()
        .lock()
        .issue_reply_token(ACME_CHANNEL, &user(4));
    let reply = client
        .send(SendRequest {
            tenant_id: ACME.into(),
            channel_id: ACME_CHANNEL.into(),
            idempotency_key: "r".into(),
            target: Some(send_request::Target::ReplyToken(token)),
            messages_json: vec![text("hi")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for job in [multicast, reply] {
        let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
        assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    }
    let recipients: HashSet<String> = mesh.sent().into_iter().map(|m| m.recipient).collect();
    assert_eq!(
        recipients,
        HashSet::from([user(1), user(2), user(3), user(4)])
    );
}

#[tokio::test]
async fn bad_requests_get_a_field_level_error_and_tenants_are_walled_off() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    let mut client = mesh.client();
    let cases: Vec<(SendRequest, tonic::Code, &str)> = vec![
        (
            SendRequest {
                target: None,
                ..push(ACME, ACME_CHANNEL, "k", &user(1), "x")
            },
            tonic::Code::InvalidArgument,
            "target",
        ),
        (
            push(ACME, ACME_CHANNEL, "", &user(1), "x"),
            tonic::Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            push(ACME, ACME_CHANNEL, "k", "someone", "x"),
            tonic::Code::InvalidArgument,
            "push_to",
        ),
        (
            SendRequest {
                messages_json: vec![r#"{"type":"text"}"#.into()],
                ..push(ACME, ACME_CHANNEL, "k", &user(1), "x")
            },
            tonic::Code::InvalidArgument,
            "messages_json[0].text",
        ),
        (
            SendRequest {
                messages_json: (0..6).map(|i| text(&i.to_string())).collect(),
                ..push(ACME, ACME_CHANNEL, "k", &user(1), "x")
            },
            tonic::Code::InvalidArgument,
            "messages_json",
        ),
        (
            SendRequest {
                target: Some(send_request::Target::MulticastTo(Recipients {
                    user_ids: (0..501).map(user).collect(),
                })),
                ..push(ACME, ACME_CHANNEL, "k", &user(1), "x")
            },
            tonic::Code::InvalidArgument,
            "multicast_to.user_ids",
        ),
        // The other tenant's channel, or none at all.
        (
            push(ACME, GLOBEX_CHANNEL, "k", &user(1), "x"),
            tonic::Code::NotFound,
            GLOBEX_CHANNEL,
        ),
        (
            push(ACME, "999", "k", &user(1), "x"),
            tonic::Code::NotFound,
            "999",
        ),
    ];
    for (request, code, field) in cases {
        let status = client.send(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    // An operator of globex may not act on acme.
    let (url, _) = mesh.delivery.as_ref().unwrap();
    let mut globex = DeliveryServiceClient::new(authorized(url, &operator_token(GLOBEX)));
    let status = globex
        .send(push(ACME, ACME_CHANNEL, "k", &user(1), "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // Jobs are the tenant's own.
    let job = client
        .send(push(ACME, ACME_CHANNEL, "k", &user(1), "x"))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .get_job(GetJobRequest {
            tenant_id: GLOBEX.into(),
            job_id: job.job_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let link = client
        .link_rich_menu(LinkRichMenuRequest {
            tenant_id: ACME.into(),
            channel_id: ACME_CHANNEL.into(),
            idempotency_key: "l".into(),
            user_id: user(1),
            menu: Some(link_rich_menu_request::Menu::Alias("nope".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(link.code(), tonic::Code::NotFound, "{link:?}");
    assert!(link.message().contains("nope"));
}

#[tokio::test]
async fn a_409_counts_as_sent_and_nothing_goes_out_twice() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    // An earlier attempt under the same key reached LINE (its answer was
    // lost): send it straight to line-sim.
    let key = keys::retry_key(ACME, ACME_CHANNEL, "run:7:step:1");
    let first = reqwest::Client::new()
        .post(format!("{}/v2/bot/message/push", mesh.sim.api_url()))
        .bearer_auth("token-a")
        .header("x-line-retry-key", &key)
        .json(&serde_json::json!({"to": user(7), "messages": [{"type": "text", "text": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let mut client = mesh.client();
    let job = client
        .send(push(ACME, ACME_CHANNEL, "run:7:step:1", &user(7), "hi"))
        .await
        .unwrap()
        .into_inner();
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
    assert_eq!(done.status(), JobStatus::Succeeded);
    assert_eq!(mesh.count(Endpoint::Push, 409), 1);
    assert_eq!(mesh.sent().len(), 1);
}

#[tokio::test]
async fn a_4xx_is_dead_lettered_at_once_and_a_replay_sends_it() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    // LINE does not know acme's token: every call is a 401.
    mesh.sim.sim().lock().put_channel(SimChannel {
        channel_id: ACME_CHANNEL.into(),
        access_token: "rotated".into(),
        secret: "secret-acme".into(),
    });
    let mut client = mesh.client();
    let job = client
        .send(push(ACME, ACME_CHANNEL, "run:9:step:1", &user(9), "hello"))
        .await
        .unwrap()
        .into_inner();
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
    assert_eq!(done.status(), JobStatus::Failed);
    assert_eq!(done.attempts, 1, "a 4xx is not retried");
    assert_eq!(mesh.count(Endpoint::Push, 401), 1);
    let listed = client
        .list_dead_letters(ListDeadLettersRequest {
            tenant_id: ACME.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.dead_letters.len(), 1);
    let dead = &listed.dead_letters[0];
    assert_eq!(dead.line_status, 401);
    assert!(dead.line_body.contains("Authentication failed"), "{dead:?}");
    assert_eq!(dead.endpoint, "push");
    assert_eq!(dead.job_id, job.job_id);
    assert_eq!(dead.attempts.len(), 1);
    // The other tenant sees none of it.
    let theirs = client
        .list_dead_letters(ListDeadLettersRequest {
            tenant_id: GLOBEX.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.dead_letters.is_empty());
    let unknown = client
        .replay_dead_letters(ReplayDeadLettersRequest {
            tenant_id: ACME.into(),
            dead_letter_ids: vec!["dl-nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains("dl-nope"));

    // The token is fixed; the replay sends the call, with its retry key.
    mesh.sim.sim().lock().put_channel(SimChannel {
        channel_id: ACME_CHANNEL.into(),
        access_token: "token-a".into(),
        secret: "secret-acme".into(),
    });
    let replayed = client
        .replay_dead_letters(ReplayDeadLettersRequest {
            tenant_id: ACME.into(),
            dead_letter_ids: vec![dead.dead_letter_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
    assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.recipients_failed, 0);
    let sent = mesh.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].retry_key.as_deref(),
        Some(keys::retry_key(ACME, ACME_CHANNEL, "run:9:step:1").as_str())
    );
    let listed = client
        .list_dead_letters(ListDeadLettersRequest {
            tenant_id: ACME.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.dead_letters.is_empty(),
        "a replayed letter is not listed"
    );
}

#[tokio::test]
async fn with_5xx_and_timeouts_every_push_arrives_exactly_once() {
    let faults = Faults {
        error_rate: 0.3,
        timeout_rate: 0.1,
        processed_rate: 0.5,
        ..Faults::default()
    };
    let sim = SimConfig {
        faults,
        timeout_hold: Duration::from_secs(3),
        ..SimConfig::default()
    };
    // Coalescing off: every push leaves as a push under its own key.
    let mesh = Mesh::start(
        sim,
        &[
            ("HIBIKI_DELIVERY_COALESCE_MS", "0"),
            ("HIBIKI_LINE_TIMEOUT_MS", "300"),
            ("HIBIKI_DELIVERY_MAX_ATTEMPTS", "30"),
        ],
    )
    .await
    .with_delivery()
    .await;
    let mut client = mesh.client();
    let mut jobs = Vec::new();
    for n in 0..60 {
        let job = client
            .send(push(
                ACME,
                ACME_CHANNEL,
                &format!("k{n}"),
                &user(n),
                &format!("message {n}"),
            ))
            .await
            .unwrap()
            .into_inner();
        jobs.push(job.job_id);
    }
    for id in &jobs {
        let done = finished(&mut client, ACME, id, Duration::from_secs(60)).await;
        assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    }
    let sent = mesh.sent();
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for m in &sent {
        *per_user.entry(m.recipient.clone()).or_default() += 1;
    }
    assert_eq!(per_user.len(), 60);
    assert!(
        per_user.values().all(|n| *n == 1),
        "a duplicate: {per_user:?}"
    );
    let retried = mesh.count(Endpoint::Push, 500) + mesh.count(Endpoint::Push, 503);
    assert!(retried > 0, "faults were injected");
}

#[tokio::test]
async fn links_to_one_menu_leave_as_bulk_links_and_each_user_is_linked_once() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    let campaign = mesh
        .sim
        .sim()
        .create_rich_menu(ACME_CHANNEL, "campaign", Some("campaign"));
    let normal = mesh
        .sim
        .sim()
        .create_rich_menu(ACME_CHANNEL, "normal", None);
    let mut client = mesh.client();
    let mut jobs = Vec::new();
    // 1,000 users to the campaign menu (half by alias), 50 to the normal one,
    // sent by 8 callers at once.
    let mut tasks = Vec::new();
    for caller in 0..8u64 {
        let mut client = client.clone();
        let (campaign, normal) = (campaign.clone(), normal.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in (caller..1050).step_by(8) {
                let menu = if n >= 1000 {
                    link_rich_menu_request::Menu::RichMenuId(normal.clone())
                } else if n % 2 == 0 {
                    link_rich_menu_request::Menu::Alias("campaign".into())
                } else {
                    link_rich_menu_request::Menu::RichMenuId(campaign.clone())
                };
                let job = client
                    .link_rich_menu(LinkRichMenuRequest {
                        tenant_id: ACME.into(),
                        channel_id: ACME_CHANNEL.into(),
                        idempotency_key: format!("link{n}"),
                        user_id: user(n),
                        menu: Some(menu),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                ids.push((user(n), job.job_id));
            }
            ids
        }));
    }
    for t in tasks {
        jobs.extend(t.await.unwrap());
    }
    // Each job names the LINE request that linked its user.
    let changes = mesh.links_succeeded(&mut client, ACME, &jobs).await;
    let mut linked: HashMap<String, Vec<String>> = HashMap::new();
    let mut bulk = 0;
    for c in &changes {
        linked
            .entry(c.user_id.clone())
            .or_default()
            .push(c.rich_menu_id.clone().unwrap());
        if c.endpoint == Endpoint::BulkLinkRichMenu {
            bulk += 1;
        }
    }
    assert_eq!(linked.len(), 1050);
    for (u, menus) in &linked {
        let n: u64 = u64::from_str_radix(&u[1..], 16).unwrap();
        let want = if n >= 1000 { &normal } else { &campaign };
        assert_eq!(menus, &vec![want.clone()], "user {n}");
    }
    // Most links left in bulk (the first of a burst may leave alone), none
    // in a bulk link of more than 500.
    assert!(bulk * 100 >= 1050 * 90, "only {bulk} of 1050 in bulk links");
    let bulk_calls = mesh.count(Endpoint::BulkLinkRichMenu, 202);
    let mut per_call: HashMap<&str, usize> = HashMap::new();
    for c in changes
        .iter()
        .filter(|c| c.endpoint == Endpoint::BulkLinkRichMenu)
    {
        *per_call.entry(c.request_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_call.len() as u64, bulk_calls);
    assert!(bulk_calls >= 3, "{bulk_calls} bulk calls");
    assert!(
        per_call.values().all(|&n| (2..=500).contains(&n)),
        "{per_call:?}"
    );
    // Analytics hears of each LINE call once, with the users it linked.
    let key = format!("{}:delivery:outcomes", mesh.env["HIBIKI_REDIS_PREFIX"]);
    let calls: HashSet<&str> = changes.iter().map(|c| c.request_id.as_str()).collect();
    // Published just after each call settles: wait for the last ones.
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcomes: Vec<DeliveryOutcomeRecord> = loop {
        let found = hibiki_testkit::stream_fields(&mesh.env["HIBIKI_REDIS_URL"], &key, "o").await;
        if found.len() >= calls.len() || Instant::now() >= deadline {
            break found
                .iter()
                .map(|b| prost::Message::decode(b.as_slice()).unwrap())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(outcomes.len(), calls.len(), "one outcome per call");
    assert!(
        outcomes
            .iter()
            .all(|o| o.outcome() == DeliveryOutcome::Accepted)
    );
    let ids: HashSet<&str> = outcomes.iter().map(|o| o.outcome_id.as_str()).collect();
    assert_eq!(ids.len(), outcomes.len(), "outcome ids are distinct");
    let by_endpoint = |e: Endpoint| -> (usize, i64) {
        let of: Vec<_> = outcomes.iter().filter(|o| o.endpoint == e.name()).collect();
        (of.len(), of.iter().map(|o| o.recipients).sum())
    };
    let (bulk_outcomes, bulk_users) = by_endpoint(Endpoint::BulkLinkRichMenu);
    let (single_outcomes, single_users) = by_endpoint(Endpoint::LinkRichMenu);
    assert_eq!(bulk_outcomes as u64, bulk_calls);
    assert_eq!(bulk_users, bulk as i64);
    assert_eq!(single_outcomes as i64, single_users);
    assert_eq!(bulk_users + single_users, 1050);
    assert!(
        outcomes
            .iter()
            .filter(|o| o.recipients > 1)
            .all(|o| o.job_id.is_empty()),
        "a coalesced call names no single job"
    );

    // An unlink goes out too.
    let job = client
        .unlink_rich_menu(UnlinkRichMenuRequest {
            tenant_id: ACME.into(),
            channel_id: ACME_CHANNEL.into(),
            idempotency_key: "unlink1".into(),
            user_id: user(1),
        })
        .await
        .unwrap()
        .into_inner();
    finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
    assert!(
        !mesh
            .sim
            .sim()
            .lock()
            .user_menus
            .contains_key(&(ACME_CHANNEL.to_owned(), user(1)))
    );
}

#[tokio::test]
async fn one_tenants_backlog_does_not_hold_up_anothers_messages() {
    // Pushes limited to 50 a second on LINE's side and delivery's.
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
    // acme queues 400 different pushes: 8 s at its limit.
    let mut acme_jobs = Vec::new();
    for n in 0..400 {
        let job = client
            .send(push(
                ACME,
                ACME_CHANNEL,
                &format!("a{n}"),
                &user(n),
                &format!("offer {n}"),
            ))
            .await
            .unwrap()
            .into_inner();
        acme_jobs.push(job.job_id);
    }
    // globex's taps arrive behind it and are answered at once.
    let started = Instant::now();
    let mut globex_jobs = Vec::new();
    for n in 0..5 {
        let job = client
            .send(push(
                GLOBEX,
                GLOBEX_CHANNEL,
                &format!("g{n}"),
                &user(1000 + n),
                "thanks",
            ))
            .await
            .unwrap()
            .into_inner();
        globex_jobs.push(job.job_id);
    }
    for id in &globex_jobs {
        let done = finished(&mut client, GLOBEX, id, Duration::from_secs(10)).await;
        assert_eq!(done.status(), JobStatus::Succeeded);
    }
    let globex_took = started.elapsed();
    let acme_sent = mesh
        .sent()
        .iter()
        .filter(|m| m.channel_id == ACME_CHANNEL)
        .count();
    assert!(
        acme_sent < 300,
        "globex finished after {globex_took:?}, when acme had sent {acme_sent} of 400"
    );
    // And no 429 from LINE: delivery kept to the limit.
    let last = acme_jobs.last().unwrap();
    let done = finished(&mut client, ACME, last, Duration::from_secs(30)).await;
    assert_eq!(done.status(), JobStatus::Succeeded);
    assert_eq!(mesh.count(Endpoint::Push, 429), 0);
}

#[tokio::test]
async fn a_switch_is_not_held_behind_messages_waiting_at_their_limit() {
    // Pushes limited to 50 a second; 8 calls in flight per endpoint, so a
    // queue reads up to 128 ahead. This replica takes requests and sends
    // nothing.
    let mut sim = SimConfig::default();
    sim.limits.insert(Endpoint::Push, Limit::per_second(50));
    let mesh = Mesh::start(
        sim,
        &[
            ("HIBIKI_DELIVERY_LIMITS", "push=50/s"),
            ("HIBIKI_DELIVERY_COALESCE_MS", "0"),
            ("HIBIKI_DELIVERY_CHANNEL_CONCURRENCY", "8"),
            ("HIBIKI_DELIVERY_WORKERS", "false"),
        ],
    )
    .await
    .with_delivery()
    .await;
    let menu = mesh
        .sim
        .sim()
        .create_rich_menu(ACME_CHANNEL, "campaign", None);
    let mut client = mesh.client();
    // 700 different pushes: 14 s at the push limit, more than the queue
    // reads ahead.
    for n in 0..700 {
        client
            .send(push(
                ACME,
                ACME_CHANNEL,
                &format!("p{n}"),
                &user(n),
                &format!("offer {n}"),
            ))
            .await
            .unwrap();
    }
    // A switch queued behind them, in the same channel's queue.
    let job = client
        .link_rich_menu(LinkRichMenuRequest {
            tenant_id: ACME.into(),
            channel_id: ACME_CHANNEL.into(),
            idempotency_key: "switch".into(),
            user_id: user(5000),
            menu: Some(link_rich_menu_request::Menu::RichMenuId(menu.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    // A sending replica starts: the switch (a bulk link of one, read before
    // the queue's other calls) leaves under the link limit at once, not
    // after the pushes ahead of it.
    let mut env = mesh.env.clone();
    env.insert("HIBIKI_DELIVERY_WORKERS".into(), "true".into());
    let (_url, _sender, _task) = lifecycle::start::<hibiki_delivery::Application>(&env).await;
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(30)).await;
    assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    let pushed = mesh.sent().len();
    assert!(
        pushed < 300,
        "the switch was linked after {pushed} of the 700 pushes queued before it"
    );
    let linked = mesh
        .sim
        .sim()
        .lock()
        .user_menus
        .get(&(ACME_CHANNEL.to_owned(), user(5000)))
        .cloned();
    assert_eq!(linked, Some(menu));
    assert_eq!(mesh.count(Endpoint::Push, 429), 0);
}

#[tokio::test]
async fn a_429_pauses_the_channel_without_spending_attempts() {
    let mesh = Mesh::start(
        SimConfig::default(),
        &[
            ("HIBIKI_DELIVERY_MAX_ATTEMPTS", "1"),
            ("HIBIKI_DELIVERY_COALESCE_MS", "0"),
        ],
    )
    .await
    .with_delivery()
    .await;
    mesh.sim
        .sim()
        .lock()
        .throttle_for(Duration::from_millis(700));
    let mut client = mesh.client();
    let job = client
        .send(push(ACME, ACME_CHANNEL, "t1", &user(1), "hi"))
        .await
        .unwrap()
        .into_inner();
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(10)).await;
    // With one attempt allowed, a counted 429 would have dead-lettered it.
    assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    assert!(mesh.count(Endpoint::Push, 429) >= 1);
    assert_eq!(mesh.sent().len(), 1);
}

#[tokio::test]
async fn a_worker_killed_mid_call_is_replaced_and_the_message_is_sent_once() {
    // LINE takes the push and never answers.
    let faults = Faults {
        timeout_rate: 1.0,
        processed_rate: 1.0,
        ..Faults::default()
    };
    let sim = SimConfig {
        faults,
        timeout_hold: Duration::from_secs(30),
        ..SimConfig::default()
    };
    let mesh = Mesh::start(sim, &[("HIBIKI_LINE_TIMEOUT_MS", "20000")]).await;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_hibiki-delivery"));
    let first = ServiceProcess::spawn(binary, mesh.env.clone());
    wait_for_health(&first.url, ServingStatus::Serving).await;
    let mut client = DeliveryServiceClient::new(authorized(&first.url, SERVICE_TOKEN));
    let job = client
        .send(push(
            ACME,
            ACME_CHANNEL,
            "run:5:step:2",
            &user(5),
            "your coupon",
        ))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.sent().is_empty() {
        assert!(Instant::now() < deadline, "LINE never got the push");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // kill -9 while the call is in flight.
    drop(first);
    mesh.sim.sim().lock().config.faults = Faults::default();

    let second = ServiceProcess::spawn(binary, mesh.env.clone());
    wait_for_health(&second.url, ServingStatus::Serving).await;
    let mut client = DeliveryServiceClient::new(authorized(&second.url, SERVICE_TOKEN));
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(20)).await;
    assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    assert_eq!(mesh.sent().len(), 1, "sent exactly once");
    assert_eq!(mesh.count(Endpoint::Push, 409), 1, "the resend was a 409");
}

#[tokio::test]
async fn a_broadcast_pages_the_segment_into_multicasts_of_500_each_member_once() {
    use hibiki_proto::common::v1::ContactRef;
    use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
    use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
    use hibiki_proto::contacts::v1::{
        CreateSegmentRequest, HasTag, SegmentRule, UpsertContactRequest, segment_rule::Node,
    };
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    // 1,100 friends in the campaign (three pages: 500, 500, 100), and 20 not.
    let mut tasks = Vec::new();
    for caller in 0..8u64 {
        let mut contacts = ContactServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN));
        tasks.push(tokio::spawn(async move {
            for n in (caller..1120).step_by(8) {
                let tags = if n < 1100 {
                    vec!["campaign:spring".to_owned()]
                } else {
                    vec![]
                };
                contacts
                    .upsert_contact(UpsertContactRequest {
                        contact: Some(ContactRef {
                            tenant_id: ACME.into(),
                            line_user_id: user(n),
                        }),
                        add_tags: tags,
                        idempotency_key: format!("seed{n}"),
                        ..Default::default()
                    })
                    .await
                    .expect("a contact");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let segment = SegmentServiceClient::new(authorized(&mesh.contacts, SERVICE_TOKEN))
        .create_segment(CreateSegmentRequest {
            tenant_id: ACME.into(),
            name: "spring".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag {
                    tag: "campaign:spring".into(),
                })),
            }),
        })
        .await
        .expect("a segment")
        .into_inner();
    let mut client = mesh.client();
    let request = BroadcastRequest {
        tenant_id: ACME.into(),
        channel_id: ACME_CHANNEL.into(),
        idempotency_key: "spring-sale".into(),
        segment_id: segment.segment_id.clone(),
        messages_json: vec![text("spring sale")],
        notification_disabled: false,
    };
    let job = client
        .broadcast(request.clone())
        .await
        .unwrap()
        .into_inner();
    let done = finished(&mut client, ACME, &job.job_id, Duration::from_secs(30)).await;
    assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.recipients_total, 1100);
    assert_eq!(done.recipients_succeeded, 1100);
    // A repeat is the same job, and sends nothing more.
    let again = client.broadcast(request).await.unwrap().into_inner();
    assert_eq!(again.job_id, job.job_id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = mesh.sent();
    assert_eq!(sent.len(), 1100);
    let users: HashSet<&str> = sent.iter().map(|m| m.recipient.as_str()).collect();
    assert_eq!(users.len(), 1100, "each member once");
    assert!(!users.contains(user(1105).as_str()), "a non-member got it");
    assert!(sent.iter().all(|m| m.endpoint == Endpoint::Multicast));
    assert_eq!(mesh.count(Endpoint::Multicast, 200), 3);

    let missing = client
        .broadcast(BroadcastRequest {
            segment_id: "nope".into(),
            idempotency_key: "other".into(),
            ..BroadcastRequest {
                tenant_id: ACME.into(),
                channel_id: ACME_CHANNEL.into(),
                idempotency_key: String::new(),
                segment_id: String::new(),
                messages_json: vec![text("x")],
                notification_disabled: false,
            }
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("segment_id"));
}

#[tokio::test]
async fn an_expired_reply_token_falls_back_to_a_push_and_quiet_hours_hold_a_send() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    let mut client = mesh.client();
    // LINE never issued this reply token (or it expired): push instead.
    let reply = client
        .send(SendRequest {
            tenant_id: ACME.into(),
            channel_id: ACME_CHANNEL.into(),
            idempotency_key: "run:3:step:1".into(),
            target: Some(send_request::Target::ReplyToken("expired-token".into())),
            reply_fallback_to: user(3),
            messages_json: vec![text("thanks for joining")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = finished(&mut client, ACME, &reply.job_id, Duration::from_secs(10)).await;
    assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    let sent = mesh.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].endpoint, Endpoint::Push);
    assert_eq!(sent[0].recipient, user(3));
    assert_eq!(
        sent[0].retry_key.as_deref(),
        Some(keys::retry_key(ACME, ACME_CHANNEL, "run:3:step:1").as_str())
    );
    assert_eq!(mesh.count(Endpoint::Reply, 400), 1);

    // Held until the end of the quiet window.
    let until = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let held = client
        .send(SendRequest {
            not_before: Some(hibiki_runtime::timestamp::to_proto(until)),
            ..push(ACME, ACME_CHANNEL, "quiet", &user(4), "good morning")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.status(), JobStatus::Queued);
    // A new job is answered as it was made, without reading it back: the
    // same job GetJob reads.
    let read = client
        .get_job(GetJobRequest {
            tenant_id: ACME.into(),
            job_id: held.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held, read);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(mesh.sent().len(), 1, "nothing leaves during quiet hours");
    let done = finished(&mut client, ACME, &held.job_id, Duration::from_secs(10)).await;
    assert_eq!(done.status(), JobStatus::Succeeded);
    let sent = mesh.sent();
    let morning = sent.iter().find(|m| m.recipient == user(4)).unwrap();
    assert!(
        morning.at_ms as i64 >= until.timestamp_millis(),
        "sent {} ms before the window ended",
        until.timestamp_millis() - morning.at_ms as i64
    );
}

#[tokio::test]
async fn identical_pushes_leave_as_multicasts_and_each_user_gets_one() {
    let mesh = Mesh::start(
        SimConfig::default(),
        &[("HIBIKI_DELIVERY_COALESCE_MS", "20")],
    )
    .await
    .with_delivery()
    .await;
    let client = mesh.client();
    let mut tasks = Vec::new();
    for caller in 0..8u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in (caller..400).step_by(8) {
                let job = client
                    .send(push(
                        ACME,
                        ACME_CHANNEL,
                        &format!("same{n}"),
                        &user(n),
                        "sale today",
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                ids.push(job.job_id);
            }
            ids
        }));
    }
    let mut jobs = Vec::new();
    for t in tasks {
        jobs.extend(t.await.unwrap());
    }
    let mut client = client;
    for id in &jobs {
        let done = finished(&mut client, ACME, id, Duration::from_secs(20)).await;
        assert_eq!(done.status(), JobStatus::Succeeded, "{done:?}");
    }
    let sent = mesh.sent();
    let users: HashSet<&str> = sent.iter().map(|m| m.recipient.as_str()).collect();
    assert_eq!(sent.len(), 400);
    assert_eq!(users.len(), 400, "each user once");
    let in_multicasts = sent
        .iter()
        .filter(|m| m.endpoint == Endpoint::Multicast)
        .count();
    assert!(
        in_multicasts >= 300,
        "only {in_multicasts} of 400 in multicasts"
    );
    assert!(mesh.count(Endpoint::Multicast, 200) < 100);
}

#[tokio::test]
async fn links_queued_while_nobody_sends_leave_in_full_bulk_links_and_a_refused_one_is_replayed_whole()
 {
    // This replica takes requests and sends nothing.
    let mesh = Mesh::start(
        SimConfig::default(),
        &[("HIBIKI_DELIVERY_WORKERS", "false")],
    )
    .await
    .with_delivery()
    .await;
    let campaign = mesh
        .sim
        .sim()
        .create_rich_menu(ACME_CHANNEL, "campaign", None);
    let theirs = mesh
        .sim
        .sim()
        .create_rich_menu(GLOBEX_CHANNEL, "spring", None);
    let mut client = mesh.client();
    let link = |tenant: &str, channel: &str, key: String, n: u64, menu: &str| LinkRichMenuRequest {
        tenant_id: tenant.into(),
        channel_id: channel.into(),
        idempotency_key: key,
        user_id: user(n),
        menu: Some(link_rich_menu_request::Menu::RichMenuId(menu.into())),
    };
    let mut acme = Vec::new();
    for n in 0..1050u64 {
        let job = client
            .link_rich_menu(link(
                ACME,
                ACME_CHANNEL,
                format!("gathered{n}"),
                n,
                &campaign,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(job.status(), JobStatus::Queued, "{job:?}");
        acme.push((user(n), job));
    }
    // A repeat is the same job, not another link: read back, it is the job
    // the first call answered without reading it.
    let again = client
        .link_rich_menu(link(ACME, ACME_CHANNEL, "gathered7".into(), 7, &campaign))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, acme[7].1);
    let acme: Vec<(String, String)> = acme.into_iter().map(|(u, job)| (u, job.job_id)).collect();
    let mut globex = Vec::new();
    for n in 0..20u64 {
        let job = client
            .link_rich_menu(link(
                GLOBEX,
                GLOBEX_CHANNEL,
                format!("refused{n}"),
                n,
                &theirs,
            ))
            .await
            .unwrap()
            .into_inner();
        globex.push(job.job_id);
    }
    // LINE does not know globex's token: its bulk link is refused (401).
    mesh.sim.sim().lock().put_channel(SimChannel {
        channel_id: GLOBEX_CHANNEL.into(),
        access_token: "rotated".into(),
        secret: "secret-globex".into(),
    });
    assert!(mesh.sim.sim().lock().menu_changes.is_empty());

    // A sending replica starts.
    let mut env = mesh.env.clone();
    env.insert("HIBIKI_DELIVERY_WORKERS".into(), "true".into());
    let (_url, sender, _task) = lifecycle::start::<hibiki_delivery::Application>(&env).await;
    let changes = mesh.links_succeeded(&mut client, ACME, &acme).await;
    // 1,050 links in the fewest bulk links: 500, 500 and 50.
    let mut calls: HashMap<&str, usize> = HashMap::new();
    for c in changes.iter().filter(|c| c.channel_id == ACME_CHANNEL) {
        assert_eq!(c.endpoint, Endpoint::BulkLinkRichMenu);
        assert_eq!(c.rich_menu_id.as_deref(), Some(campaign.as_str()));
        *calls.entry(c.request_id.as_str()).or_default() += 1;
    }
    let mut sizes: Vec<usize> = calls.values().copied().collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![50, 500, 500]);

    // globex's bulk link failed whole: one dead letter of 20 users.
    for id in &globex {
        let job = finished(&mut client, GLOBEX, id, Duration::from_secs(10)).await;
        assert_eq!(job.status(), JobStatus::Failed, "{job:?}");
        assert_eq!(job.recipients_failed, 1);
    }
    let dead = client
        .list_dead_letters(ListDeadLettersRequest {
            tenant_id: GLOBEX.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (
            dead[0].endpoint.as_str(),
            dead[0].recipients,
            dead[0].line_status
        ),
        ("bulk_link_rich_menu", 20, 401)
    );
    let mut named = dead[0].job_ids.clone();
    named.sort();
    let mut want = globex.clone();
    want.sort();
    assert_eq!(named, want);

    // The token is fixed and the dead letter replayed: each user is linked
    // once and each job succeeds.
    mesh.sim.sim().lock().put_channel(SimChannel {
        channel_id: GLOBEX_CHANNEL.into(),
        access_token: "token-b".into(),
        secret: "secret-globex".into(),
    });
    let replayed = client
        .replay_dead_letters(ReplayDeadLettersRequest {
            tenant_id: GLOBEX.into(),
            dead_letter_ids: vec![dead[0].dead_letter_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    for id in &globex {
        let job = finished(&mut client, GLOBEX, id, Duration::from_secs(10)).await;
        assert_eq!(job.status(), JobStatus::Succeeded, "{job:?}");
        assert_eq!((job.recipients_succeeded, job.recipients_failed), (1, 0));
        assert_eq!(job.attempts, 2, "the refused call and the replay");
    }
    let linked: Vec<String> = mesh
        .sim
        .sim()
        .lock()
        .menu_changes
        .iter()
        .filter(|c| c.channel_id == GLOBEX_CHANNEL)
        .map(|c| c.user_id.clone())
        .collect();
    let distinct: HashSet<&String> = linked.iter().collect();
    assert_eq!((linked.len(), distinct.len()), (20, 20));
    sender.trigger();
}
