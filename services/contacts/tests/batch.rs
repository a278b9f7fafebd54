//! `EditBatch`: many edits in one RPC, each done and answered as its own
//! RPC would be, against the real PostgreSQL and Redis.

mod common;

use common::*;
use hibiki_proto::common::v1::{Value, value::Kind};
use hibiki_proto::contacts::v1::segment_rule::Node;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, CreateSegmentRequest, EditBatchRequest, EditItem, GetContactRequest,
    GetSegmentCountsRequest, HasTag, MutationResponse, RemoveTagsRequest, SegmentRule,
    SetAttributesRequest, edit_item, edit_result,
};
use tonic::Code;

const T: &str = "acme";

fn item(request: edit_item::Request) -> EditItem {
    EditItem {
        request: Some(request),
        trace: None,
    }
}

fn tag(n: u32, tags: &[&str], key: &str) -> edit_item::Request {
    edit_item::Request::AddTags(AddTagsRequest {
        contact: contact(T, n),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        idempotency_key: key.into(),
    })
}

type Answer = Result<MutationResponse, (Code, String)>;

async fn edit(
    client: &mut hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient<
        Authorized,
    >,
    items: Vec<EditItem>,
) -> Vec<Answer> {
    client
        .edit_batch(EditBatchRequest { items })
        .await
        .expect("the batch is taken")
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.result.expect("every item is answered") {
            edit_result::Result::Response(response) => Ok(response),
            edit_result::Result::Error(e) => Err((Code::from_i32(e.code), e.message)),
        })
        .collect()
}

#[tokio::test]
async fn each_edit_is_done_and_answered_in_order_as_its_own_rpc_would_be() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let vip = c
        .segments()
        .create_segment(CreateSegmentRequest {
            tenant_id: T.into(),
            name: "vip".into(),
            description: String::new(),
            rule: Some(SegmentRule {
                node: Some(Node::HasTag(HasTag { tag: "vip".into() })),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id;
    let mut client = c.contacts();
    let answers = edit(
        &mut client,
        vec![
            item(tag(1, &["vip"], "k1")),
            item(tag(2, &["vip", "spring"], "k2")),
            item(tag(3, &[""], "k3")),
            item(edit_item::Request::SetAttributes(SetAttributesRequest {
                contact: contact(T, 1),
                set: [(
                    "age".to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(41.0)),
                    },
                )]
                .into(),
                unset: Vec::new(),
                idempotency_key: "k4".into(),
            })),
            item(edit_item::Request::RemoveTags(RemoveTagsRequest {
                contact: contact(T, 9),
                tags: vec!["vip".into()],
                idempotency_key: "k5".into(),
            })),
            // The first key again, in the same batch.
            item(tag(1, &["vip"], "k1")),
        ],
    )
    .await;
    assert_eq!(answers.len(), 6, "{answers:?}");
    let entered = |a: &Answer| {
        a.as_ref()
            .unwrap()
            .membership_changes
            .iter()
            .map(|m| (m.segment_id.clone(), m.line_user_id.clone(), m.entered))
            .collect::<Vec<_>>()
    };
    // Both entered vip: each answer has its own change, whichever came
    // first in the group.
    assert_eq!(entered(&answers[0]), [(vip.clone(), user(1), true)]);
    assert_eq!(entered(&answers[1]), [(vip.clone(), user(2), true)]);
    let (code, message) = answers[2].as_ref().unwrap_err();
    assert_eq!(*code, Code::InvalidArgument);
    assert!(message.contains("tags[0]"), "{message}");
    assert!(answers[3].is_ok(), "{:?}", answers[3]);
    let (code, message) = answers[4].as_ref().unwrap_err();
    assert_eq!(*code, Code::NotFound, "{message}");
    // One key, one edit: the repeat answers with the first's changes.
    let repeat = answers[5].as_ref().unwrap();
    assert_eq!(
        entered(&answers[5]),
        entered(&answers[0]),
        "the repeat of k1: {repeat:?}"
    );

    let one = client
        .get_contact(GetContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.tags, ["vip"]);
    assert!(one.attributes.contains_key("age"), "{one:?}");
    let counts = c
        .segments()
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: vec![vip.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].member_count, 2, "vip counted each contact once");
}

#[tokio::test]
async fn an_operator_batch_is_held_to_its_tenant_item_by_item_and_a_bad_batch_is_refused_whole() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    c.tenant("globex").await;
    let mut globex = c.contacts_as("globex");
    let answers = edit(
        &mut globex,
        vec![
            item(tag(1, &["x"], "o1")),
            item(edit_item::Request::AddTags(AddTagsRequest {
                contact: contact("globex", 1),
                tags: vec!["x".into()],
                idempotency_key: "o2".into(),
            })),
        ],
    )
    .await;
    assert_eq!(answers[0].as_ref().unwrap_err().0, Code::PermissionDenied);
    assert!(answers[1].is_ok(), "{answers:?}");

    let client = c.contacts();
    let refused = |items: Vec<EditItem>| {
        let mut client = client.clone();
        async move {
            client
                .edit_batch(EditBatchRequest { items })
                .await
                .unwrap_err()
        }
    };
    let none = refused(Vec::new()).await;
    assert_eq!(none.code(), Code::InvalidArgument);
    assert!(none.message().contains("items"), "{none:?}");
    let many = refused(
        (0..501)
            .map(|n| item(tag(n, &["x"], &format!("m{n}"))))
            .collect(),
    )
    .await;
    assert_eq!(many.code(), Code::InvalidArgument);
    assert!(many.message().contains("501"), "{many:?}");
    let empty = refused(vec![item(tag(1, &["x"], "e1")), EditItem::default()]).await;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("items[1].request"), "{empty:?}");
    // Nothing of a refused batch was done.
    let status = c
        .contacts()
        .get_contact(GetContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}
