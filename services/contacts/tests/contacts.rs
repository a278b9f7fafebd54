//! Contacts and segments over real gRPC against the real PostgreSQL and
//! Redis: inbound events, idempotent mutations, typed attributes, segment
//! computation and incremental maintenance, erasure, listings, and the
//! outbox publication of membership changes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Contacts, contact, event, user};
use hibiki_proto::common::v1::inbound_event::Payload;
use hibiki_proto::common::v1::{
    FollowEvent, PageRequest, PostbackEvent, UnfollowEvent, Value, value::Kind,
};
use hibiki_proto::contacts::v1::{
    AddTagsRequest, ApplyEventsRequest, AttributeCondition, Comparison, CreateSegmentRequest,
    DeleteContactRequest, EventOutcome, FollowState, FollowTransition, GetContactRequest,
    GetSegmentCountsRequest, HasTag, ListContactsRequest, ListSegmentMembersRequest,
    MembershipChange, MembershipChangeRecord, RemoveTagsRequest, RuleList, SegmentRule,
    SegmentStatus, SetAttributesRequest, UpsertContactRequest, segment_rule::Node,
};
use prost::Message;
use tonic::Code;

const T: &str = "acme";

fn has_tag(tag: &str) -> SegmentRule {
    SegmentRule {
        node: Some(Node::HasTag(HasTag { tag: tag.into() })),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn follow(unblocked: bool) -> Payload {
    Payload::Follow(FollowEvent {
        is_unblocked: unblocked,
    })
}

async fn create_segment(c: &Contacts, name: &str, rule: SegmentRule) -> String {
    let segment = c
        .segments()
        .create_segment(CreateSegmentRequest {
            tenant_id: T.into(),
            name: name.into(),
            description: String::new(),
            rule: Some(rule),
        })
        .await
        .expect("the segment is created")
        .into_inner();
    assert_eq!(
        segment.status,
        SegmentStatus::Ready as i32,
        "small segments come back READY"
    );
    segment.segment_id
}

async fn count(c: &Contacts, segment: &str) -> i64 {
    c.segments()
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: vec![segment.into()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts[0]
        .member_count
}

async fn add_tags(
    c: &Contacts,
    n: u32,
    tags: &[&str],
    key: &str,
) -> hibiki_proto::contacts::v1::MutationResponse {
    c.contacts()
        .add_tags(AddTagsRequest {
            contact: contact(T, n),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            idempotency_key: key.into(),
        })
        .await
        .expect("tags are added")
        .into_inner()
}

#[tokio::test]
async fn apply_events_follows_blocks_and_refollows_and_a_replay_changes_nothing() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let mut client = c.contacts();
    let batches = [
        vec![
            event(T, "e1", 1, 1_000, follow(false)),
            event(
                T,
                "e2",
                2,
                1_000,
                Payload::Postback(PostbackEvent {
                    data: "a=1".into(),
                    params: Default::default(),
                }),
            ),
        ],
        vec![event(
            T,
            "e3",
            1,
            2_000,
            Payload::Unfollow(UnfollowEvent {}),
        )],
        vec![event(T, "e4", 1, 3_000, follow(true))],
    ];
    let want = [
        vec![FollowTransition::Followed, FollowTransition::None],
        vec![FollowTransition::Blocked],
        vec![FollowTransition::Refollowed],
    ];
    for (batch, want) in batches.iter().zip(&want) {
        let results = client
            .apply_events(ApplyEventsRequest {
                tenant_id: T.into(),
                events: batch.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        let got: Vec<_> = results
            .iter()
            .map(|r| (r.outcome, r.follow_transition))
            .collect();
        let want: Vec<_> = want
            .iter()
            .map(|t| (EventOutcome::Applied as i32, *t as i32))
            .collect();
        assert_eq!(got, want);
    }
    let get = |n| GetContactRequest {
        contact: contact(T, n),
    };
    let u1 = client.get_contact(get(1)).await.unwrap().into_inner();
    assert_eq!(u1.follow_state, FollowState::Following as i32);
    assert_eq!(u1.refollow_count, 1);
    assert_eq!(u1.blocked_at.as_ref().map(|t| t.seconds), Some(2));
    assert_eq!(u1.last_seen_at.as_ref().map(|t| t.seconds), Some(3));
    let u2 = client.get_contact(get(2)).await.unwrap().into_inner();
    assert_eq!(
        u2.follow_state,
        FollowState::Unspecified as i32,
        "a postback alone is no follow"
    );

    // LINE redelivers everything: nothing changes, everything is DUPLICATE.
    let all: Vec<_> = batches.concat();
    let results = client
        .apply_events(ApplyEventsRequest {
            tenant_id: T.into(),
            events: all,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        results
            .iter()
            .all(|r| r.outcome == EventOutcome::Duplicate as i32)
    );
    assert_eq!(client.get_contact(get(1)).await.unwrap().into_inner(), u1);
}

#[tokio::test]
async fn a_redelivery_inside_one_batch_counts_once() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let e = event(T, "same", 1, 1_000, follow(false));
    let results = c
        .contacts()
        .apply_events(ApplyEventsRequest {
            tenant_id: T.into(),
            events: vec![e.clone(), e],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].outcome, EventOutcome::Applied as i32);
    assert_eq!(results[1].outcome, EventOutcome::Duplicate as i32);
}

#[tokio::test]
async fn a_late_follow_does_not_undo_a_newer_block() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let mut client = c.contacts();
    for e in [
        event(T, "block", 1, 5_000, Payload::Unfollow(UnfollowEvent {})),
        event(T, "late-follow", 1, 4_000, follow(false)),
    ] {
        client
            .apply_events(ApplyEventsRequest {
                tenant_id: T.into(),
                events: vec![e],
            })
            .await
            .unwrap();
    }
    let u = client
        .get_contact(GetContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.follow_state, FollowState::Blocked as i32);
    assert_eq!(u.last_seen_at.map(|t| t.seconds), Some(5));
}

#[tokio::test]
async fn bad_events_are_rejected_by_index_and_events_without_a_user_touch_no_contact() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let mut client = c.contacts();
    let err = client
        .apply_events(ApplyEventsRequest {
            tenant_id: T.into(),
            events: vec![
                event(T, "a", 1, 1, follow(false)),
                event("globex", "b", 2, 1, follow(false)),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("events[1].tenant_id: "), "{err}");

    let mut group = event(T, "g", 1, 1, Payload::Postback(PostbackEvent::default()));
    group.source.as_mut().unwrap().user_id.clear();
    let results = client
        .apply_events(ApplyEventsRequest {
            tenant_id: T.into(),
            events: vec![group],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].outcome, EventOutcome::NoContact as i32);

    let err = c
        .contacts_as("globex")
        .apply_events(ApplyEventsRequest {
            tenant_id: T.into(),
            events: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn mutations_are_idempotent_and_report_the_membership_changes_they_caused() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let spring = create_segment(&c, "spring", has_tag("campaign:spring")).await;

    let first = add_tags(&c, 1, &["campaign:spring"], "run1:step1").await;
    let entered = MembershipChange {
        segment_id: spring.clone(),
        line_user_id: user(1),
        entered: true,
        count_after: 1,
    };
    assert_eq!(first.membership_changes, std::slice::from_ref(&entered));
    assert!(!first.replayed);

    // The same key again (a retried RPC, a replayed step): the first result,
    // and nothing counted twice.
    let again = add_tags(&c, 1, &["campaign:spring"], "run1:step1").await;
    assert!(again.replayed);
    assert_eq!(again.membership_changes, [entered]);
    assert_eq!(count(&c, &spring).await, 1);
    // GetContact names the segments the contact is in.
    let member = c
        .contacts()
        .get_contact(GetContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(member.segment_ids, std::slice::from_ref(&spring));

    let removed = c
        .contacts()
        .remove_tags(RemoveTagsRequest {
            contact: contact(T, 1),
            tags: vec!["campaign:spring".into()],
            idempotency_key: "run1:step2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.membership_changes.len(), 1);
    assert!(!removed.membership_changes[0].entered);
    assert_eq!(count(&c, &spring).await, 0);

    let err = c
        .contacts()
        .remove_tags(RemoveTagsRequest {
            contact: contact(T, 1),
            tags: vec!["x".into()],
            idempotency_key: "run1:step1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("idempotency_key: "), "{err}");

    let err = c
        .contacts()
        .add_tags(AddTagsRequest {
            contact: contact(T, 1),
            tags: vec!["ok".into()],
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("idempotency_key: "), "{err}");
}

#[tokio::test]
async fn an_attribute_keeps_its_type() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let set = |key: &str, value: Value, idem: &str| SetAttributesRequest {
        contact: contact(T, 1),
        set: [(key.to_owned(), value)].into(),
        unset: vec![],
        idempotency_key: idem.into(),
    };
    c.contacts()
        .set_attributes(set("age", number(30.0), "k1"))
        .await
        .unwrap();
    let err = c
        .contacts()
        .set_attributes(set(
            "age",
            Value {
                kind: Some(Kind::StringValue("thirty".into())),
            },
            "k2",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("set.age: "), "{err}");
    let stored = c
        .contacts()
        .get_contact(GetContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.attributes["age"], number(30.0));
}

#[tokio::test]
async fn a_segment_is_computed_set_wise_then_maintained_incrementally() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    // 30 contacts: every third is a vip, ages 0..30.
    for n in 0..30u32 {
        let tags = if n % 3 == 0 {
            vec!["vip".to_owned()]
        } else {
            vec![]
        };
        c.contacts()
            .upsert_contact(UpsertContactRequest {
                contact: contact(T, n),
                display_name: Some(format!("friend {n}")),
                add_tags: tags,
                set_attributes: [("age".to_owned(), number(f64::from(n)))].into(),
                idempotency_key: String::new(),
            })
            .await
            .unwrap();
    }
    // vip and age >= 15: 15, 18, 21, 24, 27.
    let rule = SegmentRule {
        node: Some(Node::All(RuleList {
            rules: vec![
                has_tag("vip"),
                SegmentRule {
                    node: Some(Node::Attribute(AttributeCondition {
                        key: "age".into(),
                        op: Comparison::Ge as i32,
                        value: Some(number(15.0)),
                        values: vec![],
                    })),
                },
            ],
        })),
    };
    let segment = create_segment(&c, "older vips", rule).await;
    assert_eq!(count(&c, &segment).await, 5);

    // Ages move contacts in and out; tags too.
    c.contacts()
        .set_attributes(SetAttributesRequest {
            contact: contact(T, 3),
            set: [("age".to_owned(), number(40.0))].into(),
            unset: vec![],
            idempotency_key: "k1".into(),
        })
        .await
        .unwrap();
    let r = add_tags(&c, 16, &["vip"], "k2").await;
    assert_eq!(r.membership_changes.len(), 1);
    assert_eq!(r.membership_changes[0].count_after, 7);
    c.contacts()
        .set_attributes(SetAttributesRequest {
            contact: contact(T, 27),
            set: Default::default(),
            unset: vec!["age".into()],
            idempotency_key: "k3".into(),
        })
        .await
        .unwrap();
    let members: Vec<String> = c
        .segments()
        .list_segment_members(ListSegmentMembersRequest {
            tenant_id: T.into(),
            segment_id: segment.clone(),
            page: Some(PageRequest {
                page_size: 4,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .line_user_ids;
    assert_eq!(members, [user(3), user(15), user(16), user(18)]);
    assert_eq!(count(&c, &segment).await, 6);

    // The contacts listing filters by segment and by tag.
    let in_segment = c
        .contacts()
        .list_contacts(ListContactsRequest {
            tenant_id: T.into(),
            segment_id: segment.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .contacts;
    assert_eq!(in_segment.len(), 6);
    let vips = c
        .contacts()
        .list_contacts(ListContactsRequest {
            tenant_id: T.into(),
            tag: "vip".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .contacts;
    assert_eq!(vips.len(), 11);
}

#[tokio::test]
async fn an_invalid_rule_is_rejected_naming_the_node() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let rule = SegmentRule {
        node: Some(Node::Any(RuleList {
            rules: vec![has_tag("ok"), has_tag("")],
        })),
    };
    let err = c
        .segments()
        .create_segment(CreateSegmentRequest {
            tenant_id: T.into(),
            name: "bad".into(),
            description: String::new(),
            rule: Some(rule),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("rule.any[1].has_tag.tag: "),
        "{err}"
    );
}

#[tokio::test]
async fn erasing_a_contact_removes_its_memberships_and_adjusts_counts() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let vip = create_segment(&c, "vip", has_tag("vip")).await;
    add_tags(&c, 1, &["vip"], "k1").await;
    add_tags(&c, 2, &["vip"], "k2").await;
    assert_eq!(count(&c, &vip).await, 2);

    let erased = c
        .contacts()
        .delete_contact(DeleteContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.membership_changes.len(), 1);
    assert_eq!(count(&c, &vip).await, 1);
    let err = c
        .contacts()
        .get_contact(GetContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .contacts()
        .delete_contact(DeleteContactRequest {
            contact: contact(T, 1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_follow_moves_the_contact_into_a_follow_state_segment() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let friends = create_segment(
        &c,
        "friends",
        SegmentRule {
            node: Some(Node::FollowState(FollowState::Following as i32)),
        },
    )
    .await;
    let results = c
        .contacts()
        .apply_events(ApplyEventsRequest {
            tenant_id: T.into(),
            events: vec![event(T, "f1", 7, 1_000, follow(false))],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        results[0].membership_changes,
        [MembershipChange {
            segment_id: friends.clone(),
            line_user_id: user(7),
            entered: true,
            count_after: 1
        }]
    );
}

/// Reads every membership change record on the stream.
async fn published(c: &Contacts) -> Vec<MembershipChangeRecord> {
    let key = format!("{}:contacts:{{membership}}", c.env["HIBIKI_REDIS_PREFIX"]);
    hibiki_testkit::stream_payloads(&c.env["HIBIKI_REDIS_URL"], &key)
        .await
        .iter()
        .map(|p| MembershipChangeRecord::decode(p.as_slice()).unwrap())
        .collect()
}

#[tokio::test]
async fn committed_membership_changes_are_published_to_redis() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let vip = create_segment(&c, "vip", has_tag("vip")).await;
    add_tags(&c, 1, &["vip"], "k1").await;
    add_tags(&c, 1, &["vip"], "k1").await; // replayed: publishes nothing new

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = published(&c).await;
        if records.iter().any(|r| r.change.is_some()) || tokio::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let changes: Vec<&MembershipChange> =
        records.iter().filter_map(|r| r.change.as_ref()).collect();
    assert_eq!(changes.len(), 1, "{records:?}");
    assert_eq!(
        (changes[0].segment_id.as_str(), changes[0].entered),
        (vip.as_str(), true)
    );
    let computed = records
        .iter()
        .find_map(|r| r.bulk.as_ref())
        .expect("the computed segment is announced");
    assert_eq!(
        (computed.segment_id.as_str(), computed.delta),
        (vip.as_str(), 0)
    );
    let ids: BTreeSet<&str> = records.iter().map(|r| r.change_id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "change ids are unique");

    // Once the count deltas are folded (every second), the change already
    // published is not published again: the records sum to the count.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let records = published(&c).await;
    let sum: i64 = records
        .iter()
        .map(|r| match (&r.change, &r.bulk) {
            (Some(c), _) => {
                if c.entered {
                    1
                } else {
                    -1
                }
            }
            (None, Some(b)) => b.delta,
            _ => 0,
        })
        .sum();
    assert_eq!(sum, count(&c, &vip).await, "{records:?}");
    assert_eq!(sum, 1);
    assert!(records.iter().all(|r| r.snapshot.is_none()), "{records:?}");
}

/// Every member of a segment, through ListSegmentMembers' pages.
async fn all_members(c: &Contacts, segment: &str) -> Vec<String> {
    let mut members = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .segments()
            .list_segment_members(ListSegmentMembersRequest {
                tenant_id: T.into(),
                segment_id: segment.into(),
                page: Some(PageRequest {
                    page_size: 4,
                    page_token: token,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        members.extend(page.line_user_ids);
        token = page.page.unwrap().next_page_token;
        if token.is_empty() {
            return members;
        }
    }
}

#[tokio::test]
async fn a_changed_rule_is_swept_over_every_contact_and_a_deleted_segment_leaves_no_trace() {
    // Sweeps of 7 contacts a transaction over 30 contacts: five batches.
    let c = Contacts::start_with(&[("HIBIKI_SEGMENT_SWEEP_BATCH", "7")]).await;
    c.tenant(T).await;
    for n in 0..30u32 {
        c.contacts()
            .upsert_contact(UpsertContactRequest {
                contact: contact(T, n),
                add_tags: if n % 3 == 0 {
                    vec!["vip".into()]
                } else {
                    vec![]
                },
                set_attributes: [("age".to_owned(), number(f64::from(n)))].into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let age = |op: Comparison, n: f64| SegmentRule {
        node: Some(Node::Attribute(AttributeCondition {
            key: "age".into(),
            op: op as i32,
            value: Some(number(n)),
            values: vec![],
        })),
    };
    let segment = create_segment(&c, "adults", age(Comparison::Ge, 18.0)).await;
    assert_eq!(count(&c, &segment).await, 12);
    assert_eq!(
        all_members(&c, &segment).await,
        (18..30).map(user).collect::<Vec<_>>()
    );

    // A new rule: every contact is evaluated again, members leave and enter.
    let updated = c
        .segments()
        .update_segment(hibiki_proto::contacts::v1::UpdateSegmentRequest {
            tenant_id: T.into(),
            segment_id: segment.clone(),
            rule: Some(age(Comparison::Lt, 10.0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.status, SegmentStatus::Ready as i32);
    assert_eq!(updated.member_count, 10);
    assert_eq!(count(&c, &segment).await, 10);
    assert_eq!(
        all_members(&c, &segment).await,
        (0..10).map(user).collect::<Vec<_>>()
    );

    // Deleted: gone from every listing; a new segment counts only its own.
    c.segments()
        .delete_segment(hibiki_proto::contacts::v1::DeleteSegmentRequest {
            tenant_id: T.into(),
            segment_id: segment.clone(),
        })
        .await
        .unwrap();
    let err = c
        .segments()
        .list_segment_members(ListSegmentMembersRequest {
            tenant_id: T.into(),
            segment_id: segment.clone(),
            page: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let vips = create_segment(&c, "vips", has_tag("vip")).await;
    assert_eq!(count(&c, &vips).await, 10);
    assert_eq!(
        all_members(&c, &vips).await,
        (0..30).filter(|n| n % 3 == 0).map(user).collect::<Vec<_>>()
    );
    // A contact that was in the deleted segment changes: nothing breaks,
    // and the counts stay exact.
    add_tags(&c, 1, &["vip"], "late").await;
    assert_eq!(count(&c, &vips).await, 11);
}
