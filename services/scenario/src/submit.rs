//! Delivery requests of many runs in one RPC. The steps of runs walking side
//! by side hand their sends and rich menu links to a [`Submitter`]; what
//! queued while earlier batches were in flight goes to delivery as one
//! `SubmitBatch` ([`hibiki_runtime::group`]). A request alone goes at once,
//! and batches grow with the load: under a storm, hundreds of steps cost
//! delivery one RPC instead of one each.
//!
//! Each item carries the trace of the step that made it, so its spans in
//! delivery, and its call to LINE, stay in the run's trace. A delivery that
//! does not know `SubmitBatch` yet (UNIMPLEMENTED, during a rolling
//! upgrade) gets the batch's requests one RPC each.

use std::collections::VecDeque;

use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{
    BatchItem, Job, LinkRichMenuRequest, SendRequest, SubmitBatchRequest, batch_item, batch_result,
};
use hibiki_runtime::grpc::ClientInterceptor;
use hibiki_runtime::telemetry;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};
use tracing::Instrument;

type Client = DeliveryServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>,
>;

/// The most requests in one batch (delivery takes up to 500).
const MAX_ITEMS: usize = 500;
/// Batches in flight at once.
const AT_ONCE: usize = 4;

/// A request waiting for its batch, and where its answer goes.
struct Pending {
    item: BatchItem,
    answer: oneshot::Sender<Result<Job, Status>>,
}

/// Hands delivery requests to batches.
#[derive(Clone)]
pub struct Submitter {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Submitter {
    /// Starts the loop that sends batches through `delivery` (on the current
    /// tokio runtime); it ends when the last clone of the submitter is gone.
    pub fn start(delivery: Client) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(hibiki_runtime::group::group_commit(
            waiting,
            AT_ONCE,
            4 * MAX_ITEMS,
            take,
            move |group| submit(delivery.clone(), group),
        ));
        Self { queue }
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
        let trace = telemetry::current_trace_context();
        let item = BatchItem {
            request: Some(request),
            trace: (!trace.traceparent.is_empty()).then_some(trace),
        };
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Pending { item, answer })
            .map_err(|_| Status::unavailable("scenario's delivery batches stopped"))?;
        answered
            .await
            .map_err(|_| Status::unavailable("scenario's delivery batches stopped"))?
    }
}

/// Up to [`MAX_ITEMS`] waiting requests, in order.
fn take(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let n = waiting.len().min(MAX_ITEMS);
    waiting.drain(..n).collect()
}

/// Sends one batch and hands each request its answer.
async fn submit(mut delivery: Client, group: Vec<Pending>) {
    let (items, answers): (Vec<BatchItem>, Vec<_>) =
        group.into_iter().map(|p| (p.item, p.answer)).unzip();
    metrics::histogram!("hibiki_scenario_delivery_batch_items").record(items.len() as f64);
    let results = match delivery
        .submit_batch(SubmitBatchRequest {
            items: items.clone(),
        })
        .await
    {
        Ok(response) => {
            let results = response.into_inner().results;
            if results.len() == answers.len() {
                results.into_iter().map(answer_of).collect()
            } else {
                let status = Status::internal(format!(
                    "delivery answered {} results for {} requests",
                    results.len(),
                    answers.len()
                ));
                vec![Err(status); answers.len()]
            }
        }
        Err(s) if s.code() == Code::Unimplemented => one_by_one(&mut delivery, items).await,
        Err(s) => vec![Err(s); answers.len()],
    };
    for (answer, result) in answers.into_iter().zip(results) {
        // A caller that went away no longer needs its answer.
        let _ = answer.send(result);
    }
}

fn answer_of(result: hibiki_proto::delivery::v1::BatchResult) -> Result<Job, Status> {
    match result.result {
        Some(batch_result::Result::Job(job)) => Ok(job),
        Some(batch_result::Result::Error(e)) => Err(Status::new(Code::from_i32(e.code), e.message)),
        None => Err(Status::internal("delivery answered a request with nothing")),
    }
}

/// The requests one RPC each, for a delivery without `SubmitBatch`.
async fn one_by_one(delivery: &mut Client, items: Vec<BatchItem>) -> Vec<Result<Job, Status>> {
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        // In the step's trace, as the batch item would have been.
        let span = tracing::info_span!("scenario.delivery_request");
        if let Some(trace) = &item.trace {
            telemetry::set_parent(&span, telemetry::context_from_payload(trace));
        }
        let answer = async {
            match item.request {
                Some(batch_item::Request::Send(r)) => delivery.send(r).await,
                Some(batch_item::Request::LinkRichMenu(r)) => delivery.link_rich_menu(r).await,
                Some(batch_item::Request::UnlinkRichMenu(r)) => delivery.unlink_rich_menu(r).await,
                None => Err(Status::internal("a batch item without its request")),
            }
        }
        .instrument(span)
        .await;
        results.push(answer.map(tonic::Response::into_inner));
    }
    results
}
