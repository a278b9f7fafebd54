//! Record streams (contacts' membership changes, delivery's outcomes)
//! against the real Redis: one reader of a group at a time, what a dead
//! holder left pending handed out first, and a waiting reader that gets a
//! record published while it waits from that same read.

use std::time::Duration;

use hibiki_runtime::records::RecordReader;
use hibiki_runtime::redis::{Redis, redis};
use hibiki_testkit::redis_of_its_own;

async fn publish(redis: &Redis, stream: &str, payload: &str) {
    let _: String = redis
        .command(
            redis::cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("o")
                .arg(payload),
        )
        .await
        .expect("published");
}

fn payloads(entries: &[(String, Vec<u8>)]) -> Vec<&str> {
    entries
        .iter()
        .map(|(_, p)| std::str::from_utf8(p).expect("text"))
        .collect()
}

fn reader(redis: &Redis, stream: &str, name: &str) -> RecordReader {
    RecordReader::new(
        redis.clone(),
        stream.to_owned(),
        "analytics",
        name,
        "o",
        Duration::from_secs(5),
    )
    .waiting(Duration::from_secs(2))
}

#[tokio::test]
async fn a_waiting_reader_gets_a_record_published_while_it_waits() {
    let (redis, _keys) = redis_of_its_own();
    let stream = redis.key(&["delivery", "outcomes"]);
    let mut holder = reader(&redis, &stream, "holder");

    // Nothing yet: the first read takes the lease, makes the group and
    // waits its time out.
    assert!(holder.read(10).await.unwrap().is_empty());

    // A record published while the holder waits comes out of that read.
    let published = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish(&redis, &stream, "first").await;
    };
    let (read, ()) = tokio::join!(holder.read(10), published);
    let read = read.unwrap();
    assert_eq!(payloads(&read), ["first"]);

    // Another reader of the group gets nothing while the lease is held.
    publish(&redis, &stream, "second").await;
    let mut standby = reader(&redis, &stream, "standby");
    assert!(standby.read(10).await.unwrap().is_empty());
    let read_next = holder.read(10).await.unwrap();
    assert_eq!(payloads(&read_next), ["second"]);

    // The holder leaves with "second" unacknowledged: the standby takes
    // the lease and hands it out again before anything new.
    let ids: Vec<String> = read.iter().map(|(id, _)| id.clone()).collect();
    holder.ack(&ids).await.unwrap();
    holder.release().await;
    publish(&redis, &stream, "third").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let entries = standby.read(10).await.unwrap();
        assert!(
            !entries.is_empty(),
            "the standby read nothing; seen {seen:?}"
        );
        seen.extend(payloads(&entries).into_iter().map(str::to_owned));
    }
    assert_eq!(seen, ["second", "third"]);
}
