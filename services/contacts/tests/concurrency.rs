//! Many concurrent writers on the same contacts and one hot segment never
//! leave a wrong membership or count: afterwards every maintained count
//! equals the number of contacts marked as members, and those equal a
//! recount of each rule written independently in SQL here.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use common::{Contacts, contact, event};
use hibiki_proto::common::v1::inbound_event::Payload;
use hibiki_proto::common::v1::{FollowEvent, UnfollowEvent, Value, value::Kind};
use hibiki_proto::contacts::v1::{
    AddTagsRequest, ApplyEventsRequest, AttributeCondition, Comparison, CreateSegmentRequest,
    FollowState, GetSegmentCountsRequest, HasTag, RemoveTagsRequest, RuleList, SegmentRule,
    SetAttributesRequest, UpsertContactRequest, segment_rule::Node,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const T: &str = "acme";
const USERS: u32 = 40;
const WRITERS: u64 = 8;
const OPS: usize = 60;

fn has_tag(tag: &str) -> SegmentRule {
    SegmentRule {
        node: Some(Node::HasTag(HasTag { tag: tag.into() })),
    }
}

/// The segment of contacts tagged `vip` in tenant `T`.
async fn vip_segment(c: &Contacts) -> String {
    c.segments()
        .create_segment(CreateSegmentRequest {
            tenant_id: T.into(),
            name: "vip".into(),
            rule: Some(has_tag("vip")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .segment_id
}

/// The maintained count of `segment` in tenant `T`.
async fn member_count(c: &Contacts, segment: &str) -> i64 {
    c.segments()
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: vec![segment.to_owned()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts[0]
        .member_count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_a_hot_segment_leave_exact_counts() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    for n in 0..USERS {
        c.contacts()
            .upsert_contact(UpsertContactRequest {
                contact: contact(T, n),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // (name, rule, the same rule as SQL written independently here)
    let score_ge_5 = SegmentRule {
        node: Some(Node::Attribute(AttributeCondition {
            key: "score".into(),
            op: Comparison::Ge as i32,
            value: Some(Value {
                kind: Some(Kind::NumberValue(5.0)),
            }),
            values: vec![],
        })),
    };
    let segments = [
        ("hot", has_tag("hot"), "tags @> '{hot}'"),
        (
            "friends",
            SegmentRule {
                node: Some(Node::FollowState(FollowState::Following as i32)),
            },
            "follow_state = 1",
        ),
        (
            "hot or high",
            SegmentRule {
                node: Some(Node::Any(RuleList {
                    rules: vec![has_tag("hot"), score_ge_5],
                })),
            },
            "tags @> '{hot}' OR (jsonb_typeof(attributes->'score') = 'number' AND (attributes->>'score')::float8 >= 5)",
        ),
    ];
    let mut ids = Vec::new();
    for (name, rule, sql) in &segments {
        let s = c
            .segments()
            .create_segment(CreateSegmentRequest {
                tenant_id: T.into(),
                name: (*name).into(),
                description: String::new(),
                rule: Some(rule.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push((s.segment_id, *sql));
    }

    let clock = Arc::new(AtomicI64::new(1_000));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut contacts = c.contacts();
        let clock = clock.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            for op in 0..OPS {
                let n = rng.random_range(0..USERS);
                let key = format!("w{w}-op{op}");
                let result = match rng.random_range(0..4) {
                    0 => contacts
                        .add_tags(AddTagsRequest {
                            contact: contact(T, n),
                            tags: vec!["hot".into()],
                            idempotency_key: key,
                        })
                        .await
                        .map(|_| ()),
                    1 => contacts
                        .remove_tags(RemoveTagsRequest {
                            contact: contact(T, n),
                            tags: vec!["hot".into()],
                            idempotency_key: key,
                        })
                        .await
                        .map(|_| ()),
                    2 => contacts
                        .set_attributes(SetAttributesRequest {
                            contact: contact(T, n),
                            set: [(
                                "score".to_owned(),
                                Value {
                                    kind: Some(Kind::NumberValue(f64::from(
                                        rng.random_range(0..10),
                                    ))),
                                },
                            )]
                            .into(),
                            unset: vec![],
                            idempotency_key: key,
                        })
                        .await
                        .map(|_| ()),
                    _ => {
                        let events = (0..3)
                            .map(|i| {
                                let at = clock.fetch_add(1, Ordering::SeqCst);
                                let payload = if rng.random_bool(0.5) {
                                    Payload::Follow(FollowEvent {
                                        is_unblocked: false,
                                    })
                                } else {
                                    Payload::Unfollow(UnfollowEvent {})
                                };
                                event(
                                    T,
                                    &format!("{key}-{i}"),
                                    rng.random_range(0..USERS),
                                    at,
                                    payload,
                                )
                            })
                            .collect();
                        contacts
                            .apply_events(ApplyEventsRequest {
                                tenant_id: T.into(),
                                events,
                            })
                            .await
                            .map(|_| ())
                    }
                };
                result.unwrap_or_else(|e| panic!("writer {w} op {op}: {e}"));
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }

    let pool = c.pool().await;
    let counts = c
        .segments()
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    for (segment, sql) in &ids {
        let maintained = counts
            .iter()
            .find(|x| &x.segment_id == segment)
            .unwrap()
            .member_count;
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM contacts.contacts c JOIN contacts.segments s USING (tenant_id) \
             WHERE c.tenant_id = $1 AND s.segment_id = $2 AND c.segs @> ARRAY[s.no]",
        )
        .bind(T)
        .bind(segment)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(maintained, rows, "segment {sql}: count vs members");
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT c.line_user_id FROM contacts.contacts c JOIN contacts.segments s USING (tenant_id) \
             WHERE c.tenant_id = $1 AND s.segment_id = $2 AND c.segs @> ARRAY[s.no] ORDER BY 1",
        )
        .bind(T)
        .bind(segment)
        .fetch_all(&pool)
        .await
        .unwrap();
        let recount: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT line_user_id FROM contacts.contacts WHERE tenant_id = $1 AND ({sql}) ORDER BY 1"
        )))
        .bind(T)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(members, recount, "segment {sql}: members vs recount");
    }
    // The hot segment really was contended.
    assert!(counts.iter().any(|x| x.member_count > 0));
}

/// Edits that arrive together are written together (one transaction for a
/// group), yet each is answered as if written alone: its own membership
/// change with the count right after it, a repeat of its key replayed, a
/// refused edit refused on its own while the others are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edits_arriving_together_are_each_answered_as_if_written_alone() {
    const N: u32 = 150;
    let c = Contacts::start().await;
    c.tenant(T).await;
    let vip = vip_segment(&c).await;
    let tag = |n: u32, key: String| {
        let mut client = c.contacts();
        async move {
            client
                .add_tags(AddTagsRequest {
                    contact: contact(T, n),
                    tags: vec!["vip".into()],
                    idempotency_key: key,
                })
                .await
        }
    };

    // N new contacts tagged at once, plus a key used first for AddTags and
    // then for RemoveTags, and RemoveTags of a contact that does not exist.
    let mut calls = Vec::new();
    for n in 0..N {
        calls.push(tag(n, format!("tag-{n}")));
    }
    let first = futures::future::join_all(calls);
    let mut remover = c.contacts();
    let missing = remover.remove_tags(RemoveTagsRequest {
        contact: contact(T, 9_999),
        tags: vec!["vip".into()],
        idempotency_key: "remove-missing".into(),
    });
    let (first, missing) = tokio::join!(first, missing);
    let missing = missing.expect_err("no such contact");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    // Each answer is its own contact's change, with the count its
    // transaction saw right after it (groups written side by side may see
    // the same count; it is never beyond the members there are).
    let mut answers = Vec::new();
    for (n, answer) in first.into_iter().enumerate() {
        let answer = answer.expect("tagged").into_inner();
        assert!(!answer.replayed);
        assert_eq!(answer.membership_changes.len(), 1, "{answer:?}");
        let change = &answer.membership_changes[0];
        assert_eq!(change.line_user_id, common::user(n as u32));
        assert_eq!(change.segment_id, vip);
        assert!(change.entered);
        assert!(
            (1..=i64::from(N)).contains(&change.count_after),
            "{change:?}"
        );
        answers.push(answer);
    }

    // Repeats of every key, at once: replayed with the first answers, and
    // a key reused for another operation refused on its own.
    let mut calls = Vec::new();
    for n in 0..N {
        calls.push(tag(n, format!("tag-{n}")));
    }
    let again = futures::future::join_all(calls);
    let mut reuser = c.contacts();
    let reused = reuser.remove_tags(RemoveTagsRequest {
        contact: contact(T, 0),
        tags: vec!["vip".into()],
        idempotency_key: "tag-7".into(),
    });
    let (again, reused) = tokio::join!(again, reused);
    let reused = reused.expect_err("a key of AddTags");
    assert_eq!(reused.code(), tonic::Code::InvalidArgument, "{reused:?}");
    assert!(
        reused.message().contains("already used for AddTags"),
        "{reused:?}"
    );
    for (n, answer) in again.into_iter().enumerate() {
        let answer = answer.expect("replayed").into_inner();
        assert!(answer.replayed, "tag-{n} was written again");
        assert_eq!(
            answer.membership_changes, answers[n].membership_changes,
            "tag-{n}"
        );
    }
    assert_eq!(member_count(&c, &vip).await, i64::from(N));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_many_times_at_once_is_written_once() {
    const USERS_AT_ONCE: u32 = 60;
    const REPEATS: usize = 8;
    let c = Contacts::start().await;
    c.tenant(T).await;
    let vip = vip_segment(&c).await;
    // Every contact's tag sent REPEATS times at once with one key (a
    // caller retrying before its first answer came back), among the others'
    // edits, so that the repeats land in groups written side by side.
    let client = c.contacts();
    let mut calls = Vec::new();
    for _ in 0..REPEATS {
        for n in 0..USERS_AT_ONCE {
            let mut client = client.clone();
            calls.push(async move {
                let answer = client
                    .add_tags(AddTagsRequest {
                        contact: contact(T, n),
                        tags: vec!["vip".into()],
                        idempotency_key: format!("once-{n}"),
                    })
                    .await
                    .expect("tagged")
                    .into_inner();
                (n, answer)
            });
        }
    }
    let answers = futures::future::join_all(calls).await;
    for n in 0..USERS_AT_ONCE {
        let mine: Vec<_> = answers
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, a)| a)
            .collect();
        let written: Vec<_> = mine.iter().filter(|a| !a.replayed).collect();
        assert_eq!(written.len(), 1, "once-{n} written {} times", written.len());
        assert_eq!(written[0].membership_changes.len(), 1, "{:?}", written[0]);
        for a in &mine {
            assert_eq!(
                a.membership_changes, written[0].membership_changes,
                "once-{n}"
            );
        }
    }
    assert_eq!(member_count(&c, &vip).await, i64::from(USERS_AT_ONCE));
}
