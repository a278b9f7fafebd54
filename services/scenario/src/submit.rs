//! The steps' calls to contacts and delivery, many runs' in one RPC. The
//! steps of runs walking side by side hand their edits (tags, attributes)
//! to an [`Editor`] and their sends and rich menu links to a [`Submitter`];
//! what queued while earlier batches were in flight goes as one
//! `EditBatch` or `SubmitBatch` ([`hibiki_runtime::group`]). A request
//! alone goes at once, and batches grow with the load: under a storm,
//! hundreds of steps cost one RPC instead of one each.
//!
//! Each item carries the trace of the step that made it, so its spans in
//! contacts and delivery, and what follows from it there, stay in the run's
//! trace. A peer that does not know the batch RPC yet (UNIMPLEMENTED,
//! during a rolling upgrade) fails that batch's requests as UNAVAILABLE,
//! which the steps retry at once, and gets requests one RPC each for the
//! next 30 s before the batch RPC is tried again.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hibiki_proto::common::v1::{BatchError, TraceContext};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::{
    AddTagsRequest, EditBatchRequest, EditItem, MutationResponse, RemoveTagsRequest,
    SetAttributesRequest, edit_item, edit_result,
};
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{
    BatchItem, Job, LinkRichMenuRequest, SendRequest, SubmitBatchRequest, batch_item, batch_result,
};
use hibiki_runtime::grpc::ClientInterceptor;
use hibiki_runtime::telemetry;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};
use tracing::Instrument;

type Intercepted =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>;

/// The most requests in one batch (contacts and delivery take up to 500).
const MAX_ITEMS: usize = 500;
/// Batches in flight at once, per peer.
const AT_ONCE: usize = 4;
/// How long requests go one by one after a peer answered UNIMPLEMENTED.
const RETRY_BATCH_AFTER: Duration = Duration::from_secs(30);

/// A peer that takes requests in batches, or one RPC each.
trait Peer: Clone + Send + Sync + 'static {
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// Its name, for metrics and errors.
    const NAME: &'static str;
    /// The trace an item carries.
    fn trace(item: &Self::Item) -> Option<&TraceContext>;
    /// The batch RPC: an answer per item, in order.
    fn batch(
        &mut self,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Answer, Status>>, Status>> + Send;
    /// The item's own RPC.
    fn alone(
        &mut self,
        item: Self::Item,
    ) -> impl Future<Output = Result<Self::Answer, Status>> + Send;
}

/// A request waiting for its batch, and where its answer goes.
struct Pending<P: Peer> {
    item: P::Item,
    answer: oneshot::Sender<Result<P::Answer, Status>>,
}

/// Requests to one peer waiting for batch RPCs.
struct Batches<P: Peer> {
    queue: mpsc::UnboundedSender<Pending<P>>,
}

impl<P: Peer> Batches<P> {
    /// Starts the loop that sends the batches to `peer` (on the current
    /// tokio runtime); it ends when the batches are dropped.
    fn start(peer: P) -> Self {
        Self::start_with(peer, RETRY_BATCH_AFTER)
    }

    /// As [`Batches::start`], trying the batch RPC again `retry_after` an
    /// UNIMPLEMENTED answer.
    fn start_with(peer: P, retry_after: Duration) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        let unbatched = Arc::new(Unbatched::new(retry_after));
        tokio::spawn(hibiki_runtime::group::group_commit(
            waiting,
            AT_ONCE,
            4 * MAX_ITEMS,
            take::<P>,
            move |group: Vec<Pending<P>>| {
                let (items, answers): (Vec<P::Item>, Vec<_>) =
                    group.into_iter().map(|p| (p.item, p.answer)).unzip();
                let sent = send(peer.clone(), unbatched.clone(), items);
                async move {
                    for (answer, result) in answers.into_iter().zip(sent.await) {
                        // A caller that went away no longer needs its answer.
                        let _ = answer.send(result);
                    }
                }
            },
        ));
        Self { queue }
    }

    /// Queues `item` and waits for its answer.
    async fn call(&self, item: P::Item) -> Result<P::Answer, Status> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Pending { item, answer })
            .map_err(|_| Status::unavailable("scenario's batches stopped"))?;
        answered
            .await
            .map_err(|_| Status::unavailable("scenario's batches stopped"))?
    }
}

/// Up to [`MAX_ITEMS`] waiting requests, in order.
fn take<P: Peer>(waiting: &mut VecDeque<Pending<P>>) -> Vec<Pending<P>> {
    let n = waiting.len().min(MAX_ITEMS);
    waiting.drain(..n).collect()
}

/// Sends one batch to `peer` and answers each of its items: with the
/// peer's answer, or the batch's error. A peer without the batch RPC
/// fails the batch as UNAVAILABLE (the steps retry at once) and gets
/// requests one RPC each for [`RETRY_BATCH_AFTER`].
async fn send<P: Peer>(
    mut peer: P,
    unbatched: Arc<Unbatched>,
    items: Vec<P::Item>,
) -> Vec<Result<P::Answer, Status>> {
    let n = items.len();
    if unbatched.now() {
        let mut results = Vec::with_capacity(n);
        for item in items {
            // In the step's trace, as the batch item would have been.
            let span = tracing::info_span!("scenario.single_request");
            if let Some(trace) = P::trace(&item) {
                telemetry::set_parent(&span, telemetry::context_from_payload(trace));
            }
            results.push(peer.alone(item).instrument(span).await);
        }
        return results;
    }
    metrics::histogram!("hibiki_scenario_batch_items", "peer" => P::NAME).record(n as f64);
    let failed = |status: Status| (0..n).map(|_| Err(status.clone())).collect();
    match peer.batch(items).await {
        Ok(results) if results.len() == n => results,
        Ok(results) => failed(Status::internal(format!(
            "{} answered {} results for {n} requests",
            P::NAME,
            results.len()
        ))),
        Err(s) if s.code() == Code::Unimplemented => {
            unbatched.note();
            tracing::warn!(
                peer = P::NAME,
                "no batch RPC (an older version?): requests go one by one for a while"
            );
            failed(Status::unavailable(format!(
                "{} takes no batches yet; retried alone",
                P::NAME
            )))
        }
        Err(s) => failed(s),
    }
}

/// Since when a peer has answered its batch RPC with UNIMPLEMENTED (during
/// a rolling upgrade), and for how long requests then go one by one.
struct Unbatched {
    since: Mutex<Option<Instant>>,
    retry_after: Duration,
}

impl Unbatched {
    fn new(retry_after: Duration) -> Self {
        Self {
            since: Mutex::new(None),
            retry_after,
        }
    }

    /// Whether requests go one by one now.
    fn now(&self) -> bool {
        let mut since = self.since.lock().expect("unbatched");
        match *since {
            Some(at) if at.elapsed() < self.retry_after => true,
            Some(_) => {
                *since = None;
                false
            }
            None => false,
        }
    }

    fn note(&self) {
        *self.since.lock().expect("unbatched") = Some(Instant::now());
    }
}

/// The current span's trace, for an item to carry.
fn current_trace() -> Option<TraceContext> {
    let trace = telemetry::current_trace_context();
    (!trace.traceparent.is_empty()).then_some(trace)
}

fn error_of(e: BatchError) -> Status {
    Status::new(Code::from_i32(e.code), e.message)
}

impl Peer for DeliveryServiceClient<Intercepted> {
    type Item = BatchItem;
    type Answer = Job;
    const NAME: &'static str = "delivery";

    fn trace(item: &BatchItem) -> Option<&TraceContext> {
        item.trace.as_ref()
    }

    async fn batch(&mut self, items: Vec<BatchItem>) -> Result<Vec<Result<Job, Status>>, Status> {
        let results = self
            .submit_batch(SubmitBatchRequest { items })
            .await?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| match r.result {
                Some(batch_result::Result::Job(job)) => Ok(job),
                Some(batch_result::Result::Error(e)) => Err(error_of(e)),
                None => Err(Status::internal("delivery answered a request with nothing")),
            })
            .collect())
    }

    async fn alone(&mut self, item: BatchItem) -> Result<Job, Status> {
        let answer = match item.request {
            Some(batch_item::Request::Send(r)) => self.send(r).await,
            Some(batch_item::Request::LinkRichMenu(r)) => self.link_rich_menu(r).await,
            Some(batch_item::Request::UnlinkRichMenu(r)) => self.unlink_rich_menu(r).await,
            None => Err(Status::internal("a batch item without its request")),
        };
        answer.map(tonic::Response::into_inner)
    }
}

impl Peer for ContactServiceClient<Intercepted> {
    type Item = EditItem;
    type Answer = MutationResponse;
    const NAME: &'static str = "contacts";

    fn trace(item: &EditItem) -> Option<&TraceContext> {
        item.trace.as_ref()
    }

    async fn batch(
        &mut self,
        items: Vec<EditItem>,
    ) -> Result<Vec<Result<MutationResponse, Status>>, Status> {
        let results = self
            .edit_batch(EditBatchRequest { items })
            .await?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| match r.result {
                Some(edit_result::Result::Response(response)) => Ok(response),
                Some(edit_result::Result::Error(e)) => Err(error_of(e)),
                None => Err(Status::internal("contacts answered an edit with nothing")),
            })
            .collect())
    }

    async fn alone(&mut self, item: EditItem) -> Result<MutationResponse, Status> {
        let answer = match item.request {
            Some(edit_item::Request::AddTags(r)) => self.add_tags(r).await,
            Some(edit_item::Request::RemoveTags(r)) => self.remove_tags(r).await,
            Some(edit_item::Request::SetAttributes(r)) => self.set_attributes(r).await,
            None => Err(Status::internal("a batch item without its request")),
        };
        answer.map(tonic::Response::into_inner)
    }
}

/// Hands delivery requests to `SubmitBatch` calls.
#[derive(Clone)]
pub struct Submitter {
    batches: Arc<Batches<DeliveryServiceClient<Intercepted>>>,
}

impl Submitter {
    /// Starts sending batches through `delivery`.
    pub fn start(delivery: DeliveryServiceClient<Intercepted>) -> Self {
        Self {
            batches: Arc::new(Batches::start(delivery)),
        }
    }

    /// Queues messages, as `Send` does.
    pub async fn send(&self, request: SendRequest) -> Result<Job, Status> {
        self.submit(batch_item::Request::Send(request)).await
    }

    /// Queues a rich menu link, as `LinkRichMenu` does.
    pub async fn link_rich_menu(&self, request: LinkRichMenuRequest) -> Result<Job, Status> {
        self.submit(batch_item::Request::LinkRichMenu(request))
            .await
    }

    async fn submit(&self, request: batch_item::Request) -> Result<Job, Status> {
        self.batches
            .call(BatchItem {
                request: Some(request),
                trace: current_trace(),
            })
            .await
    }
}

/// Hands contacts edits to `EditBatch` calls.
#[derive(Clone)]
pub struct Editor {
    batches: Arc<Batches<ContactServiceClient<Intercepted>>>,
}

impl Editor {
    /// Starts sending batches through `contacts`.
    pub fn start(contacts: ContactServiceClient<Intercepted>) -> Self {
        Self {
            batches: Arc::new(Batches::start(contacts)),
        }
    }

    /// Adds tags, as `AddTags` does.
    pub async fn add_tags(&self, request: AddTagsRequest) -> Result<MutationResponse, Status> {
        self.edit(edit_item::Request::AddTags(request)).await
    }

    /// Removes tags, as `RemoveTags` does.
    pub async fn remove_tags(
        &self,
        request: RemoveTagsRequest,
    ) -> Result<MutationResponse, Status> {
        self.edit(edit_item::Request::RemoveTags(request)).await
    }

    /// Sets attributes, as `SetAttributes` does.
    pub async fn set_attributes(
        &self,
        request: SetAttributesRequest,
    ) -> Result<MutationResponse, Status> {
        self.edit(edit_item::Request::SetAttributes(request)).await
    }

    async fn edit(&self, request: edit_item::Request) -> Result<MutationResponse, Status> {
        self.batches
            .call(EditItem {
                request: Some(request),
                trace: current_trace(),
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    //! The batching loop against a peer of an older version, one that
    //! answers the batch RPC with UNIMPLEMENTED until it is upgraded. The
    //! loop's work with real peers (contacts and delivery over gRPC) is
    //! under test in the end-to-end tests and the storm.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A peer whose answer to an item is the item doubled, counting how
    /// it was asked.
    #[derive(Clone, Default)]
    struct Doubling {
        upgraded: Arc<AtomicBool>,
        batches: Arc<AtomicUsize>,
        alone: Arc<AtomicUsize>,
        /// Answers a batch with one result too few.
        short: Arc<AtomicBool>,
    }

    impl Peer for Doubling {
        type Item = u32;
        type Answer = u32;
        const NAME: &'static str = "doubling";

        fn trace(_: &u32) -> Option<&TraceContext> {
            None
        }

        async fn batch(&mut self, items: Vec<u32>) -> Result<Vec<Result<u32, Status>>, Status> {
            if !self.upgraded.load(Ordering::SeqCst) {
                return Err(Status::unimplemented("unknown method SubmitBatch"));
            }
            self.batches.fetch_add(1, Ordering::SeqCst);
            let mut answers: Vec<_> = items
                .into_iter()
                .map(|i| {
                    if i == 13 {
                        Err(Status::invalid_argument("13 is refused"))
                    } else {
                        Ok(i * 2)
                    }
                })
                .collect();
            if self.short.load(Ordering::SeqCst) {
                answers.pop();
            }
            Ok(answers)
        }

        async fn alone(&mut self, item: u32) -> Result<u32, Status> {
            self.alone.fetch_add(1, Ordering::SeqCst);
            Ok(item * 2)
        }
    }

    #[tokio::test]
    async fn an_older_peer_gets_requests_one_by_one_until_the_window_passes() {
        let peer = Doubling::default();
        let window = Duration::from_millis(300);
        let batches = Batches::start_with(peer.clone(), window);

        // The first batch meets the old version: its requests fail as
        // UNAVAILABLE, which steps retry.
        let refused = batches
            .call(1)
            .await
            .expect_err("the old peer has no batch RPC");
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(refused.message().contains("doubling takes no batches"));

        // Within the window, each request is its own RPC.
        for i in 2..5 {
            assert_eq!(batches.call(i).await.expect("answered alone"), i * 2);
        }
        assert_eq!(peer.alone.load(Ordering::SeqCst), 3);
        assert_eq!(peer.batches.load(Ordering::SeqCst), 0);

        // The peer is upgraded; after the window the batch RPC is tried
        // again, and used from then on.
        peer.upgraded.store(true, Ordering::SeqCst);
        tokio::time::sleep(window + Duration::from_millis(50)).await;
        assert_eq!(batches.call(5).await.expect("answered in a batch"), 10);
        assert_eq!(batches.call(6).await.expect("answered in a batch"), 12);
        assert_eq!(peer.alone.load(Ordering::SeqCst), 3);
        assert_eq!(peer.batches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn requests_queued_together_get_their_own_answers_in_one_batch() {
        let peer = Doubling::default();
        peer.upgraded.store(true, Ordering::SeqCst);
        let batches = Arc::new(Batches::start(peer.clone()));

        let calls: Vec<_> = (0..2_000u32)
            .map(|i| {
                let batches = batches.clone();
                tokio::spawn(async move { (i, batches.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.expect("the call ran");
            match answer {
                Ok(doubled) => assert_eq!(doubled, i * 2),
                Err(e) => {
                    assert_eq!(i, 13, "only 13 is refused, {i} got {e}");
                    assert_eq!(e.code(), Code::InvalidArgument);
                }
            }
        }
        let rpcs = peer.batches.load(Ordering::SeqCst);
        assert!(
            rpcs >= 2_000 / MAX_ITEMS,
            "no batch holds more than {MAX_ITEMS}"
        );
        assert!(rpcs < 2_000, "requests queued together share a batch");
        assert_eq!(peer.alone.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_batch_answered_with_the_wrong_number_of_results_fails_every_request() {
        let peer = Doubling::default();
        peer.upgraded.store(true, Ordering::SeqCst);
        peer.short.store(true, Ordering::SeqCst);
        let batches = Batches::start(peer.clone());

        let failed = batches.call(7).await.expect_err("no answer can be trusted");
        assert_eq!(failed.code(), Code::Internal);
        assert!(
            failed
                .message()
                .contains("doubling answered 0 results for 1 requests")
        );
    }
}
