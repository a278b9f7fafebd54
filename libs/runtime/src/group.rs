//! Group commit: writes that arrive while others are being written share
//! one transaction.
//!
//! Under a storm, thousands of small writes (a contact's tag, a run's
//! steps) each take a pooled connection for a handful of round trips, and
//! the pool, not PostgreSQL, becomes the queue. A service that can write
//! many of them with the same statements instead sends them to a
//! [`group_commit`] loop: it takes what is waiting, forms a group, and
//! hands it to the writer, with at most `at_once` groups in flight. Nothing
//! waits to fill a group: a group is what queued while the previous ones
//! were written, so a write alone is written at once, and groups grow with
//! the load.
//!
//! Answers travel inside the items (a `oneshot::Sender` each), so the
//! writer decides what each caller hears, including when a group fails and
//! its items are written one by one.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

/// Takes items from `queue` until every sender is gone. Each round:
/// waits for a free slot (at most `at_once` groups in flight), gathers what
/// is waiting (up to `backlog` items), lets `take` form one group (the rest
/// stays waiting, in order) and spawns `write` on it.
pub async fn group_commit<T, F, Fut>(
    mut queue: mpsc::UnboundedReceiver<T>,
    at_once: usize,
    backlog: usize,
    take: fn(&mut VecDeque<T>) -> Vec<T>,
    write: F,
) where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(at_once.max(1)));
    let mut waiting: VecDeque<T> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(item) => waiting.push_back(item),
                None => return,
            }
        }
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // What queued while the previous groups were written.
        while waiting.len() < backlog {
            match queue.try_recv() {
                Ok(item) => waiting.push_back(item),
                Err(_) => break,
            }
        }
        let group = take(&mut waiting);
        if group.is_empty() {
            continue;
        }
        let written = write(group);
        tokio::spawn(async move {
            written.await;
            drop(slot);
        });
    }
}

/// Moves out of `waiting` the items `admit` accepts, in order, leaving the
/// others in order. `admit` sees each item once, first to last, and keeps
/// its own state (the group so far: its size, the keys it holds).
pub fn take_admitted<T>(waiting: &mut VecDeque<T>, mut admit: impl FnMut(&T) -> bool) -> Vec<T> {
    let mut group = Vec::new();
    let mut rest = VecDeque::with_capacity(waiting.len());
    while let Some(item) = waiting.pop_front() {
        if admit(&item) {
            group.push(item);
        } else {
            rest.push_back(item);
        }
    }
    *waiting = rest;
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    #[test]
    fn take_admitted_keeps_the_rest_in_order() {
        let mut waiting: VecDeque<u32> = (1..=8).collect();
        let mut taken = 0;
        let group = take_admitted(&mut waiting, |n| {
            let ok = n % 2 == 0 && taken < 3;
            taken += usize::from(ok);
            ok
        });
        assert_eq!(group, [2, 4, 6]);
        assert_eq!(Vec::from(waiting), [1, 3, 5, 7, 8]);
    }

    fn take_even_first(
        waiting: &mut VecDeque<(u32, oneshot::Sender<usize>)>,
    ) -> Vec<(u32, oneshot::Sender<usize>)> {
        let even = waiting.front().is_some_and(|(n, _)| n % 2 == 0);
        take_admitted(waiting, |(n, _)| (n % 2 == 0) == even)
    }

    #[tokio::test]
    async fn items_that_wait_are_written_in_groups_and_each_is_answered() {
        let (tx, rx) = mpsc::unbounded_channel();
        let groups: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        // A first item, then nine more queued while its group is written.
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let seen = groups.clone();
        let writer = tokio::spawn(group_commit(rx, 1, 100, take_even_first, move |group| {
            let seen = seen.clone();
            let mut gate = gate_rx.clone();
            async move {
                let size = group.len();
                seen.lock()
                    .unwrap()
                    .push(group.iter().map(|(n, _)| *n).collect());
                let _ = gate.wait_for(|open| *open).await;
                for (_, answer) in group {
                    let _ = answer.send(size);
                }
            }
        }));
        let mut answers = Vec::new();
        for n in 0..10u32 {
            let (answer, heard) = oneshot::channel();
            tx.send((n, answer)).unwrap();
            answers.push(heard);
            if n == 0 {
                // The first group (item 0 alone) is being written.
                while groups.lock().unwrap().is_empty() {
                    tokio::task::yield_now().await;
                }
            }
        }
        gate_tx.send(true).unwrap();
        let mut sizes = Vec::new();
        for heard in answers {
            sizes.push(heard.await.expect("every item is answered"));
        }
        drop(tx);
        writer.await.unwrap();
        let groups = groups.lock().unwrap().clone();
        assert_eq!(groups[0], [0]);
        // The nine that waited: the odds (item 1 came first), then the
        // evens, each group together.
        assert_eq!(groups[1..], [vec![1, 3, 5, 7, 9], vec![2, 4, 6, 8]]);
        assert_eq!(sizes, [1, 5, 4, 5, 4, 5, 4, 5, 4, 5]);
    }
}
