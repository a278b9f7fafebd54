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

/// A request waiting for its batch, and where its answer goes.
struct Pending<I, A> {
    item: I,
    answer: oneshot::Sender<Result<A, Status>>,
}

/// Requests of one kind waiting for batch RPCs.
struct Batches<I, A> {
    queue: mpsc::UnboundedSender<Pending<I, A>>,
}

impl<I: Send + 'static, A: Send + 'static> Batches<I, A> {
    /// Starts the loop that sends the batches with `send` (on the current
    /// tokio runtime); it ends when the batches are dropped. `send` answers
    /// each item of a batch, in order.
    fn start<F, Fut>(send: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<A, Status>>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(hibiki_runtime::group::group_commit(
            waiting,
            AT_ONCE,
            4 * MAX_ITEMS,
            take::<I, A>,
            move |group: Vec<Pending<I, A>>| {
                let (items, answers): (Vec<I>, Vec<_>) =
                    group.into_iter().map(|p| (p.item, p.answer)).unzip();
                let sent = send(items);
                async move {
                    let results = sent.await;
                    for (answer, result) in answers.into_iter().zip(results) {
                        // A caller that went away no longer needs its answer.
                        let _ = answer.send(result);
                    }
                }
            },
        ));
        Self { queue }
    }

    async fn call(&self, item: I) -> Result<A, Status> {
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
fn take<I, A>(waiting: &mut VecDeque<Pending<I, A>>) -> Vec<Pending<I, A>> {
    let n = waiting.len().min(MAX_ITEMS);
    waiting.drain(..n).collect()
}

/// The current span's trace, for an item to carry.
fn current_trace() -> Option<TraceContext> {
    let trace = telemetry::current_trace_context();
    (!trace.traceparent.is_empty()).then_some(trace)
}

/// A span continuing an item's trace, for its single RPC.
fn item_span(trace: Option<&TraceContext>) -> tracing::Span {
    let span = tracing::info_span!("scenario.single_request");
    if let Some(trace) = trace {
        telemetry::set_parent(&span, telemetry::context_from_payload(trace));
    }
    span
}

/// Whether a peer lacks its batch RPC (UNIMPLEMENTED, during a rolling
/// upgrade): then requests go one RPC each, and the batch RPC is tried
/// again after [`RETRY_BATCH_AFTER`].
#[derive(Default)]
struct Unbatched(std::sync::Mutex<Option<std::time::Instant>>);

/// How long requests go one by one after a peer answered UNIMPLEMENTED.
const RETRY_BATCH_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Unbatched {
    fn now(&self) -> bool {
        let mut since = self.0.lock().expect("unbatched");
        match *since {
            Some(at) if at.elapsed() < RETRY_BATCH_AFTER => true,
            Some(_) => {
                *since = None;
                false
            }
            None => false,
        }
    }

    /// Notes that the peer answered UNIMPLEMENTED; what the batch held is
    /// answered UNAVAILABLE, so the steps retry it (one RPC each).
    fn noted<A>(&self, n: usize, peer: &str) -> Vec<Result<A, Status>> {
        *self.0.lock().expect("unbatched") = Some(std::time::Instant::now());
        tracing::warn!(
            peer,
            "no batch RPC (an older version?): requests go one by one for a while"
        );
        let status = Status::unavailable(format!("{peer} takes no batches yet; retried alone"));
        (0..n).map(|_| Err(status.clone())).collect()
    }
}

/// What a batch answered, item by item: `n` results, or the batch's error
/// for each of its items.
fn answers<R, A>(
    n: usize,
    answered: Result<Vec<R>, Status>,
    answer: impl Fn(R) -> Result<A, Status>,
) -> Vec<Result<A, Status>> {
    match answered {
        Ok(results) if results.len() == n => results.into_iter().map(answer).collect(),
        Ok(results) => {
            let status = Status::internal(format!(
                "the batch was answered with {} results for {n} requests",
                results.len()
            ));
            (0..n).map(|_| Err(status.clone())).collect()
        }
        Err(s) => (0..n).map(|_| Err(s.clone())).collect(),
    }
}

fn error_of(e: BatchError) -> Status {
    Status::new(Code::from_i32(e.code), e.message)
}

/// Hands delivery requests to `SubmitBatch` calls.
#[derive(Clone)]
pub struct Submitter {
    batches: std::sync::Arc<Batches<BatchItem, Job>>,
}

impl Submitter {
    /// Starts sending batches through `delivery`.
    pub fn start(delivery: DeliveryServiceClient<Intercepted>) -> Self {
        let unbatched = std::sync::Arc::new(Unbatched::default());
        let batches = Batches::start(move |items: Vec<BatchItem>| {
            let mut delivery = delivery.clone();
            let unbatched = unbatched.clone();
            async move {
                let n = items.len();
                if unbatched.now() {
                    let mut results = Vec::with_capacity(n);
                    for item in items {
                        let span = item_span(item.trace.as_ref());
                        results.push(submit_alone(&mut delivery, item).instrument(span).await);
                    }
                    return results;
                }
                metrics::histogram!("hibiki_scenario_batch_items", "peer" => "delivery")
                    .record(n as f64);
                let answered = delivery
                    .submit_batch(SubmitBatchRequest { items })
                    .await
                    .map(|r| r.into_inner().results);
                match answered {
                    Err(s) if s.code() == Code::Unimplemented => unbatched.noted(n, "delivery"),
                    answered => answers(n, answered, |r| match r.result {
                        Some(batch_result::Result::Job(job)) => Ok(job),
                        Some(batch_result::Result::Error(e)) => Err(error_of(e)),
                        None => Err(Status::internal("delivery answered a request with nothing")),
                    }),
                }
            }
        });
        Self {
            batches: std::sync::Arc::new(batches),
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

async fn submit_alone(
    delivery: &mut DeliveryServiceClient<Intercepted>,
    item: BatchItem,
) -> Result<Job, Status> {
    let answer = match item.request {
        Some(batch_item::Request::Send(r)) => delivery.send(r).await,
        Some(batch_item::Request::LinkRichMenu(r)) => delivery.link_rich_menu(r).await,
        Some(batch_item::Request::UnlinkRichMenu(r)) => delivery.unlink_rich_menu(r).await,
        None => Err(Status::internal("a batch item without its request")),
    };
    answer.map(tonic::Response::into_inner)
}

/// Hands contacts edits to `EditBatch` calls.
#[derive(Clone)]
pub struct Editor {
    batches: std::sync::Arc<Batches<EditItem, MutationResponse>>,
}

impl Editor {
    /// Starts sending batches through `contacts`.
    pub fn start(contacts: ContactServiceClient<Intercepted>) -> Self {
        let unbatched = std::sync::Arc::new(Unbatched::default());
        let batches = Batches::start(move |items: Vec<EditItem>| {
            let mut contacts = contacts.clone();
            let unbatched = unbatched.clone();
            async move {
                let n = items.len();
                if unbatched.now() {
                    let mut results = Vec::with_capacity(n);
                    for item in items {
                        let span = item_span(item.trace.as_ref());
                        results.push(edit_alone(&mut contacts, item).instrument(span).await);
                    }
                    return results;
                }
                metrics::histogram!("hibiki_scenario_batch_items", "peer" => "contacts")
                    .record(n as f64);
                let answered = contacts
                    .edit_batch(EditBatchRequest { items })
                    .await
                    .map(|r| r.into_inner().results);
                match answered {
                    Err(s) if s.code() == Code::Unimplemented => unbatched.noted(n, "contacts"),
                    answered => answers(n, answered, |r| match r.result {
                        Some(edit_result::Result::Response(response)) => Ok(response),
                        Some(edit_result::Result::Error(e)) => Err(error_of(e)),
                        None => Err(Status::internal("contacts answered an edit with nothing")),
                    }),
                }
            }
        });
        Self {
            batches: std::sync::Arc::new(batches),
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

async fn edit_alone(
    contacts: &mut ContactServiceClient<Intercepted>,
    item: EditItem,
) -> Result<MutationResponse, Status> {
    let answer = match item.request {
        Some(edit_item::Request::AddTags(r)) => contacts.add_tags(r).await,
        Some(edit_item::Request::RemoveTags(r)) => contacts.remove_tags(r).await,
        Some(edit_item::Request::SetAttributes(r)) => contacts.set_attributes(r).await,
        None => Err(Status::internal("a batch item without its request")),
    };
    answer.map(tonic::Response::into_inner)
}
