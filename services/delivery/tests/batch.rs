//! `SubmitBatch`: many requests in one RPC, each queued and answered as its
//! own RPC would be, against the real contacts, Redis and line-sim.

use std::time::Duration;

use hibiki_delivery::keys;
use hibiki_line_sim::SimConfig;
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{
    BatchItem, GetJobRequest, JobKind, JobStatus, LinkRichMenuRequest, SendRequest,
    SubmitBatchRequest, UnlinkRichMenuRequest, batch_item, batch_result, link_rich_menu_request,
};
use hibiki_testkit::{authorized, operator_token};
use tonic::Code;

mod common;
use common::*;

fn item(request: batch_item::Request) -> BatchItem {
    BatchItem {
        request: Some(request),
        trace: None,
    }
}

fn link(key: &str, user: &str, menu: &str) -> batch_item::Request {
    batch_item::Request::LinkRichMenu(LinkRichMenuRequest {
        tenant_id: ACME.into(),
        channel_id: ACME_CHANNEL.into(),
        idempotency_key: key.into(),
        user_id: user.into(),
        menu: Some(link_rich_menu_request::Menu::RichMenuId(menu.into())),
    })
}

/// Each result as `Ok(job)` or `Err((code, message))`.
type Answer = Result<hibiki_proto::delivery::v1::Job, (Code, String)>;

async fn submit(client: &mut Client, items: Vec<BatchItem>) -> Vec<Answer> {
    client
        .submit_batch(SubmitBatchRequest { items })
        .await
        .expect("the batch is taken")
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.result.expect("every item is answered") {
            batch_result::Result::Job(job) => Ok(job),
            batch_result::Result::Error(e) => Err((Code::from_i32(e.code), e.message)),
        })
        .collect()
}

#[tokio::test]
async fn each_item_is_queued_and_answered_in_order_as_its_own_rpc_would_be() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    let menu = mesh
        .sim
        .sim()
        .create_rich_menu(ACME_CHANNEL, "campaign", None);
    let mut client = mesh.client();
    let answers = submit(
        &mut client,
        vec![
            item(batch_item::Request::Send(push(
                ACME,
                ACME_CHANNEL,
                "b-push",
                &user(1),
                "hello",
            ))),
            item(link("b-link", &user(2), &menu)),
            item(batch_item::Request::Send(SendRequest {
                messages_json: vec![r#"{"type":"text"}"#.into()],
                ..push(ACME, ACME_CHANNEL, "b-bad", &user(1), "x")
            })),
            item(batch_item::Request::Send(push(
                ACME,
                GLOBEX_CHANNEL,
                "b-other",
                &user(1),
                "x",
            ))),
            item(batch_item::Request::UnlinkRichMenu(UnlinkRichMenuRequest {
                tenant_id: ACME.into(),
                channel_id: ACME_CHANNEL.into(),
                idempotency_key: "b-unlink".into(),
                user_id: user(3),
            })),
            // The first item's key again, in the same batch.
            item(batch_item::Request::Send(push(
                ACME,
                ACME_CHANNEL,
                "b-push",
                &user(1),
                "hello",
            ))),
        ],
    )
    .await;
    assert_eq!(answers.len(), 6);
    let job = |k: usize| {
        answers[k]
            .as_ref()
            .unwrap_or_else(|e| panic!("item {k}: {e:?}"))
    };
    assert_eq!(job(0).kind(), JobKind::Push);
    assert_eq!(job(1).kind(), JobKind::LinkRichMenu);
    assert_eq!(job(4).kind(), JobKind::UnlinkRichMenu);
    let (code, message) = answers[2].as_ref().unwrap_err();
    assert_eq!(*code, Code::InvalidArgument);
    assert!(message.contains("messages_json[0].text"), "{message}");
    let (code, message) = answers[3].as_ref().unwrap_err();
    assert_eq!(*code, Code::NotFound);
    assert!(message.contains(GLOBEX_CHANNEL), "{message}");
    assert_eq!(job(5).job_id, job(0).job_id, "one key, one job");

    // The same request alone gets the same job, and each is sent once.
    let alone = client
        .send(push(ACME, ACME_CHANNEL, "b-push", &user(1), "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alone.job_id, job(0).job_id);
    for k in [0, 1, 4] {
        let done = finished(&mut client, ACME, &job(k).job_id, Duration::from_secs(30)).await;
        assert_eq!(done.status(), JobStatus::Succeeded, "item {k}: {done:?}");
    }
    let sent: Vec<_> = mesh
        .sent()
        .into_iter()
        .filter(|m| m.recipient == user(1))
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let menus = mesh.sim.sim().lock().menu_changes.clone();
    assert!(
        menus
            .iter()
            .any(|c| c.user_id == user(2) && c.rich_menu_id.as_deref() == Some(&*menu)),
        "{menus:?}"
    );
}

#[tokio::test]
async fn an_operator_batch_is_held_to_its_tenant_item_by_item_and_a_bad_batch_is_refused_whole() {
    let mesh = Mesh::start(SimConfig::default(), &[])
        .await
        .with_delivery()
        .await;
    let (url, _) = mesh.delivery.as_ref().unwrap();
    let mut globex = DeliveryServiceClient::new(authorized(url, &operator_token(GLOBEX)));
    let answers = submit(
        &mut globex,
        vec![
            item(batch_item::Request::Send(push(
                ACME,
                ACME_CHANNEL,
                "o-1",
                &user(1),
                "x",
            ))),
            item(batch_item::Request::Send(push(
                GLOBEX,
                GLOBEX_CHANNEL,
                "o-2",
                &user(1),
                "x",
            ))),
        ],
    )
    .await;
    assert_eq!(
        answers[0].as_ref().unwrap_err().0,
        Code::PermissionDenied,
        "{answers:?}"
    );
    assert!(answers[1].is_ok(), "{answers:?}");

    let mut client = mesh.client();
    let refused = |items: Vec<BatchItem>| {
        let mut client = client.clone();
        async move {
            client
                .submit_batch(SubmitBatchRequest { items })
                .await
                .unwrap_err()
        }
    };
    let none = refused(Vec::new()).await;
    assert_eq!(none.code(), Code::InvalidArgument);
    assert!(none.message().contains("items"), "{none:?}");
    let many = (0..501)
        .map(|n| item(link(&format!("m-{n}"), &user(n), "richmenu-x")))
        .collect();
    let many = refused(many).await;
    assert_eq!(many.code(), Code::InvalidArgument);
    assert!(many.message().contains("501"), "{many:?}");
    let empty = refused(vec![
        item(link("e-1", &user(1), "richmenu-x")),
        BatchItem::default(),
    ])
    .await;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("items[1].request"), "{empty:?}");
    // Nothing of a refused batch was queued.
    let status = client
        .get_job(GetJobRequest {
            tenant_id: ACME.into(),
            job_id: keys::job_id(ACME, ACME_CHANNEL, "e-1"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}
