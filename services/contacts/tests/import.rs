//! The bulk sync over real gRPC: bad rows are reported by row and field
//! while the rest is imported, segment counts stay exact, and an interrupted
//! import resumes without importing committed rows twice.

mod common;

use std::time::Duration;

use common::{Contacts, contact, user};
use hibiki_proto::common::v1::{Value, value::Kind};
use hibiki_proto::contacts::v1::{
    AttributeCondition, Comparison, CreateSegmentRequest, GetImportRequest,
    GetSegmentCountsRequest, HasTag, ImportBatch, ImportContactsRequest, ImportHeader,
    ImportRecord, ImportStatus, SegmentRule, SetAttributesRequest, import_contacts_request::Item,
    segment_rule::Node,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const T: &str = "acme";

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// Record `row` (1-based): user `row`, tag vip on every 4th, age = row % 50.
fn record(row: u64) -> ImportRecord {
    ImportRecord {
        row,
        line_user_id: user(row as u32),
        display_name: format!("customer {row}"),
        tags: if row.is_multiple_of(4) {
            vec!["vip".into()]
        } else {
            vec![]
        },
        attributes: [("age".to_owned(), number((row % 50) as f64))].into(),
    }
}

fn header(import_id: &str) -> ImportContactsRequest {
    ImportContactsRequest {
        item: Some(Item::Header(ImportHeader {
            tenant_id: T.into(),
            import_id: import_id.into(),
            replace_tags: false,
        })),
    }
}

fn batch(records: Vec<ImportRecord>) -> ImportContactsRequest {
    ImportContactsRequest {
        item: Some(Item::Batch(ImportBatch { records })),
    }
}

/// Imports `records` as `import_id`, `per_message` records a message, to the
/// end of the stream; the final status.
async fn import(
    c: &Contacts,
    import_id: &str,
    records: &[ImportRecord],
    per_message: usize,
) -> ImportStatus {
    let mut messages = vec![header(import_id)];
    messages.extend(records.chunks(per_message).map(|c| batch(c.to_vec())));
    c.contacts()
        .import_contacts(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
}

async fn segments(c: &Contacts) -> Vec<String> {
    let mut ids = Vec::new();
    let adult = SegmentRule {
        node: Some(Node::Attribute(AttributeCondition {
            key: "age".into(),
            op: Comparison::Ge as i32,
            value: Some(number(18.0)),
            values: vec![],
        })),
    };
    let vip = SegmentRule {
        node: Some(Node::HasTag(HasTag { tag: "vip".into() })),
    };
    for (name, rule) in [("adult", adult), ("vip", vip)] {
        ids.push(
            c.segments()
                .create_segment(CreateSegmentRequest {
                    tenant_id: T.into(),
                    name: name.into(),
                    description: String::new(),
                    rule: Some(rule),
                })
                .await
                .unwrap()
                .into_inner()
                .segment_id,
        );
    }
    ids
}

/// Maintained counts equal membership rows equal a recount.
async fn assert_counts_exact(c: &Contacts, ids: &[String]) {
    let pool = c.pool().await;
    let counts = c
        .segments()
        .get_segment_counts(GetSegmentCountsRequest {
            tenant_id: T.into(),
            segment_ids: ids.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    // In the order of `segments`: adult, vip.
    let recounts = [
        "jsonb_typeof(attributes->'age') = 'number' AND (attributes->>'age')::float8 >= 18",
        "tags @> '{vip}'",
    ];
    for (id, sql) in ids.iter().zip(recounts) {
        let count = counts.iter().find(|c| &c.segment_id == id).unwrap();
        let recount: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM contacts.contacts WHERE tenant_id = $1 AND {sql}"
        )))
        .bind(T)
        .fetch_one(&pool)
        .await
        .unwrap();
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM contacts.contacts c JOIN contacts.segments s USING (tenant_id) \
             WHERE c.tenant_id = $1 AND s.segment_id = $2 AND c.segs @> ARRAY[s.no]",
        )
        .bind(T)
        .bind(&count.segment_id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((count.member_count, rows), (recount, recount), "{sql}");
    }
}

#[tokio::test]
async fn an_import_reports_bad_rows_by_number_and_imports_the_rest() {
    let c = Contacts::start_with(&[("HIBIKI_IMPORT_CHUNK_ROWS", "1000")]).await;
    c.tenant(T).await;
    let ids = segments(&c).await;
    // A contact whose age is already a string: the import's number is refused.
    c.contacts()
        .set_attributes(SetAttributesRequest {
            contact: contact(T, 7),
            set: [(
                "age".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("unknown".into())),
                },
            )]
            .into(),
            unset: vec![],
            idempotency_key: "pre".into(),
        })
        .await
        .unwrap();

    let mut records: Vec<ImportRecord> = (1..=3000).map(record).collect();
    records[9].line_user_id = "not-a-user".into(); // row 10
    records[19].tags = vec![String::new()]; // row 20
    records[1499]
        .attributes
        .insert("score".into(), number(f64::NAN)); // row 1500
    let status = import(&c, "crm-2026-11-28", &records, 500).await;
    assert!(status.done);
    assert_eq!(
        (status.received, status.upserted, status.rejected),
        (3000, 2996, 4)
    );
    let errors: Vec<(u64, &str)> = status
        .errors
        .iter()
        .map(|e| (e.row, e.field.as_str()))
        .collect();
    assert_eq!(
        errors,
        [
            (7, "attributes.age"),
            (10, "line_user_id"),
            (20, "tags[0]"),
            (1500, "attributes.score")
        ]
    );
    assert_counts_exact(&c, &ids).await;

    let again = c
        .contacts()
        .get_import(GetImportRequest {
            tenant_id: T.into(),
            import_id: "crm-2026-11-28".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, status);
}

#[tokio::test]
async fn an_interrupted_import_resumes_and_skips_committed_chunks() {
    let c = Contacts::start_with(&[("HIBIKI_IMPORT_CHUNK_ROWS", "1000")]).await;
    c.tenant(T).await;
    let ids = segments(&c).await;
    let records: Vec<ImportRecord> = (1..=3000).map(record).collect();

    // First attempt: 2,500 rows, then the client goes away.
    let (tx, rx) = mpsc::channel(16);
    let mut client = c.contacts();
    let call = tokio::spawn(async move { client.import_contacts(ReceiverStream::new(rx)).await });
    tx.send(header("resumable")).await.unwrap();
    for chunk in records[..2500].chunks(500) {
        tx.send(batch(chunk.to_vec())).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = c
            .contacts()
            .get_import(GetImportRequest {
                tenant_id: T.into(),
                import_id: "resumable".into(),
            })
            .await;
        if matches!(&status, Ok(s) if s.get_ref().received == 2000) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "two chunks did not commit: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client dies: its call is reset mid-stream, not ended.
    call.abort();
    let _ = call.await;
    drop(tx);
    // Meanwhile a realtime change to a contact of a committed chunk: the
    // re-run must not undo it, because it skips that chunk's records.
    c.contacts()
        .set_attributes(SetAttributesRequest {
            contact: contact(T, 5),
            set: [("age".to_owned(), number(99.0))].into(),
            unset: vec![],
            idempotency_key: "between-runs".into(),
        })
        .await
        .unwrap();

    // Second attempt: the whole input again, same import id.
    let status = import(&c, "resumable", &records, 500).await;
    assert!(status.done);
    assert_eq!(
        (status.received, status.upserted, status.rejected),
        (3000, 3000, 0)
    );
    let pool = c.pool().await;
    let age: f64 = sqlx::query_scalar(
        "SELECT (attributes->>'age')::float8 FROM contacts.contacts \
         WHERE tenant_id = $1 AND line_user_id = $2",
    )
    .bind(T)
    .bind(user(5))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(age, 99.0, "a committed chunk was imported again");
    assert_counts_exact(&c, &ids).await;
}

#[tokio::test]
async fn a_record_that_changes_nothing_is_not_rewritten() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let records: Vec<ImportRecord> = (1..=200).map(record).collect();
    let pool = c.pool().await;
    let stamps = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT updated_at FROM contacts.contacts WHERE tenant_id = $1 ORDER BY line_user_id",
        )
        .bind(T)
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let mut changed = records.clone();
    changed[9].display_name = "renamed".into(); // row 10
    let mut last = Vec::new();
    for (run, input) in [&records, &records, &changed].into_iter().enumerate() {
        let status = import(&c, &format!("sync-{run}"), input, 50).await;
        assert_eq!((status.received, status.upserted), (200, 200));
        let now = stamps().await;
        match run {
            0 => {}
            1 => assert_eq!(now, last, "an identical sync rewrote contacts"),
            _ => {
                let rewritten: Vec<usize> = (0..200).filter(|&i| now[i] != last[i]).collect();
                let row10 = (1..=200u32)
                    .map(user)
                    .collect::<std::collections::BTreeSet<_>>()
                    .iter()
                    .position(|u| *u == user(10))
                    .unwrap();
                assert_eq!(rewritten, [row10], "only the changed record is rewritten");
            }
        }
        last = now;
    }
}

#[tokio::test]
async fn an_import_must_start_with_its_header_and_stay_in_its_tenant() {
    let c = Contacts::start().await;
    c.tenant(T).await;
    let err = c
        .contacts()
        .import_contacts(tokio_stream::iter(vec![batch(vec![record(1)])]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("header: "), "{err}");

    let err = c
        .contacts_as("globex")
        .import_contacts(tokio_stream::iter(vec![header("x")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().starts_with("header.tenant_id: "), "{err}");
}

#[tokio::test]
async fn an_import_that_ended_early_continues_from_its_last_row_when_the_rest_arrives() {
    let c = Contacts::start_with(&[("HIBIKI_IMPORT_CHUNK_ROWS", "1000")]).await;
    c.tenant(T).await;
    let ids = segments(&c).await;
    let records: Vec<ImportRecord> = (1..=3000).map(record).collect();
    for rows in [2500, 3000] {
        let status = import(&c, "grows", &records[..rows], 500).await;
        assert_eq!(
            (status.received, status.upserted),
            (rows as u64, rows as u64)
        );
    }
    assert_counts_exact(&c, &ids).await;
}
