//! The `notify.v1.Notifier` gRPC service.

use std::collections::HashMap;
use std::sync::Arc;

use notify_proto::channel::{partition_of, validate_channel};
use notify_proto::history::{HistoryError, HistoryStore, MAX_PAGE};
use notify_proto::pb::notifier_server::Notifier;
use notify_proto::pb::{
    HeadsRequest, HeadsResponse, HistoryRequest, HistoryResponse, PublishBatchRequest, PublishBatchResponse,
    PublishError, PublishRequest, PublishResponse, PublishResult, ReadPartitionRequest, ReadPartitionResponse,
    publish_result,
};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use crate::apikey::{ApiKeys, Caller};
use crate::committer::{Publisher, Queued};
use crate::error::Error;
use crate::limits::{self, PublishLimiter};
use crate::metrics::{self, Metrics};
use crate::spans;
use crate::store::Store;
use crate::validate;

/// Events of one `PublishBatch` call, at most.
pub const MAX_BATCH_EVENTS: usize = 100;

/// Page size of a History call whose limit is 0.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;

/// The gRPC service. Holds a [`Publisher`], so the committers' queues stay open while the server
/// has a copy of it.
#[derive(Debug)]
pub struct NotifierService {
    publisher: Publisher,
    store: Store,
    max_payload_bytes: usize,
    limiter: PublishLimiter,
    metrics: Metrics,
    keys: Arc<ApiKeys>,
}

impl NotifierService {
    /// Creates the service over the committers' publisher and the store, limiting each caller's
    /// publishes with `limiter`.
    pub fn new(publisher: Publisher, store: Store, max_payload_bytes: usize, limiter: PublishLimiter) -> Self {
        Self {
            publisher,
            store,
            max_payload_bytes,
            limiter,
            metrics: Metrics::default(),
            keys: Arc::default(),
        }
    }

    /// Records the calls in `metrics`; without this call they go to metrics no registry reads.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Requires the callers to present one of `keys`; without this call, or with no keys
    /// configured, every call is allowed.
    #[must_use]
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.keys = Arc::new(keys);
        self
    }

    /// Identifies the caller by its API key, logging a rejection without the key.
    fn authenticate<T>(&self, request: &Request<T>, call: &'static str) -> Result<Caller, Status> {
        self.keys.authenticate(request.metadata()).inspect_err(|status| {
            let client = request.remote_addr();
            tracing::debug!(call, client.addr = ?client, reason = status.message(), "call rejected");
        })
    }

    /// Counts the failures that reached the store; a request for a partition that does not
    /// exist is not one.
    fn count_store_error(&self, err: &HistoryError, operation: &'static str) {
        if matches!(err, HistoryError::Unavailable(_)) {
            self.metrics.store_error(operation);
        }
    }

    /// Returns what the events of one call share: the caller's rate key, idempotency scope and
    /// trace context.
    fn call_context<T>(&self, method: &'static str, request: &Request<T>, caller: &Caller) -> CallContext {
        CallContext {
            method,
            rate_key: limits::rate_key(request, caller.key_hash()),
            idempotency_scope: caller.idempotency_scope(),
            trace: validate::trace_context(request.metadata()),
            // The "event published" line is this module's only line inside the publish span.
            debug_logged: tracing::enabled!(tracing::Level::DEBUG),
        }
    }

    /// Queues one event for its commit inside the event's own `publish` span. The rate limit
    /// and validation errors come back at once.
    fn submit(&self, request: PublishRequest, call: &CallContext) -> Submitted {
        let span = spans::publish(call.method, &request.channel, &call.trace, call.debug_logged);
        let queued = span.in_scope(|| self.queue(request, call, &span));
        Submitted { span, queued }
    }

    fn queue(&self, request: PublishRequest, call: &CallContext, span: &Span) -> Result<Queued, Error> {
        self.limiter.check(&call.rate_key)?;
        let event = spans::validate()
            .in_scope(|| validate::publish_request(request, call.trace.clone(), self.max_payload_bytes))?;
        let mut event = spans::stamp(event, span);
        event.idempotency_scope.clone_from(&call.idempotency_scope);
        let partition = partition_of(&event.channel, self.store.partitions());
        span.record("event.partition", i64::from(partition));
        self.publisher.submit(partition, event)
    }

    /// Publishes the events of one `PublishBatch` call and returns their outcomes in order.
    async fn publish_each(
        &self,
        events: Vec<PublishRequest>,
        caller: &Caller,
        call: &CallContext,
    ) -> Vec<PublishResult> {
        // Channel name and batch index of each channel's first event that failed to queue.
        let mut failed: HashMap<String, usize> = HashMap::new();
        let mut pending = Vec::with_capacity(events.len());
        for (index, request) in events.into_iter().enumerate() {
            let metric = self.metrics.publish_call();
            let submitted = if let Some(&first_failed) = failed.get(&request.channel) {
                let channel = request.channel;
                Submitted::failed(Error::EarlierEventFailed { channel, first_failed })
            } else if let Err(status) = caller.may_publish(&request.channel) {
                failed.insert(request.channel, index);
                Submitted::failed(Error::PermissionDenied(status.message().to_owned()))
            } else {
                let channel = request.channel.clone();
                let submitted = self.submit(request, call);
                if submitted.queued.is_err() {
                    failed.insert(channel, index);
                }
                submitted
            };
            pending.push(async move {
                let outcome = submitted.committed().await;
                metric.finish(publish_result_label(&outcome));
                publish_result(outcome)
            });
        }
        futures_util::future::join_all(pending).await
    }
}

/// The settings that all events of one call share.
struct CallContext {
    method: &'static str,
    rate_key: String,
    idempotency_scope: String,
    trace: validate::TraceContext,
    debug_logged: bool,
}

/// An event queued for its commit, or the error that kept it out of the queue, with its
/// `publish` span.
struct Submitted {
    span: Span,
    queued: Result<Queued, Error>,
}

impl Submitted {
    fn failed(err: Error) -> Self {
        Self {
            span: Span::none(),
            queued: Err(err),
        }
    }

    /// Waits for the commit inside the event's span and records the outcome on it.
    async fn committed(self) -> Result<PublishResponse, Error> {
        let Self { span, queued } = self;
        let published = match queued {
            Ok(queued) => queued.committed().instrument(span.clone()).await,
            Err(err) => Err(err),
        };
        if let Ok(response) = &published {
            span.in_scope(|| {
                tracing::debug!(
                    event.id = %response.id,
                    event.position = response.position,
                    duplicate = response.duplicate,
                    "event published"
                );
            });
        }
        spans::record_outcome(&span, &published);
        published
    }
}

/// Returns the `result` label of a publish's outcome.
fn publish_result_label(outcome: &Result<PublishResponse, Error>) -> &'static str {
    match outcome {
        Ok(response) if response.duplicate => metrics::publish_result::DUPLICATE,
        Ok(_) => metrics::publish_result::OK,
        Err(err) => metrics::error_result(err),
    }
}

/// Converts the outcome of one event of a batch into its result message.
fn publish_result(outcome: Result<PublishResponse, Error>) -> PublishResult {
    let outcome = match outcome {
        Ok(response) => publish_result::Outcome::Published(response),
        Err(err) => {
            let retry_after_ms = err.retry_after_ms().unwrap_or(0);
            let status = Status::from(err);
            publish_result::Outcome::Error(PublishError {
                code: status.code() as i32,
                message: status.message().to_owned(),
                retry_after_ms,
            })
        }
    };
    PublishResult { outcome: Some(outcome) }
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        // Counts the call as `cancelled` if tonic drops this future because the caller went away.
        let call = self.metrics.publish_call();
        let authorized = self
            .authenticate(&request, "Publish")
            .and_then(|caller| caller.may_publish(&request.get_ref().channel).map(|()| caller));
        let caller = match authorized {
            Ok(caller) => caller,
            Err(status) => {
                call.finish(metrics::status_result(status.code()));
                return Err(status);
            }
        };
        let context = self.call_context("Publish", &request, &caller);
        let published = self.submit(request.into_inner(), &context).committed().await;
        call.finish(publish_result_label(&published));
        published.map(Response::new).map_err(Status::from)
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        let count = request.get_ref().events.len();
        let caller = self.authenticate(&request, "PublishBatch").inspect_err(|status| {
            self.metrics
                .reject_publishes(metrics::status_result(status.code()), count);
        })?;
        if !(1..=MAX_BATCH_EVENTS).contains(&count) {
            self.metrics
                .reject_publishes(metrics::publish_result::INVALID_ARGUMENT, count);
            return Err(Status::invalid_argument(format!(
                "a PublishBatch call holds 1 to {MAX_BATCH_EVENTS} events, and this one holds {count}; split the \
                 events over several calls"
            )));
        }
        let context = self.call_context("PublishBatch", &request, &caller);
        let results = self.publish_each(request.into_inner().events, &caller, &context).await;
        Ok(Response::new(PublishBatchResponse { results }))
    }

    async fn history(&self, request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let caller = self.authenticate(&request, "History")?;
        caller.may_read_channel(&request.get_ref().channel)?;
        let request = request.into_inner();
        validate_channel(&request.channel).map_err(|err| Error::InvalidArgument(format!("channel {err}")))?;
        let since = validate::position("since", request.since)?;
        let limit = match request.limit {
            0 => DEFAULT_HISTORY_LIMIT,
            limit => limit.min(MAX_PAGE),
        };
        let page = self
            .store
            .history(&request.channel, since, limit)
            .await
            .map_err(|err| {
                if let Some(suppressed) = crate::error::HISTORY_FAILED_LOG.allow() {
                    tracing::warn!(suppressed, error = %err, "history read failed");
                }
                self.metrics.store_error(metrics::operation::HISTORY);
                Error::StoreUnavailable
            })?;
        Ok(Response::new(page))
    }

    async fn read_partition(
        &self,
        request: Request<ReadPartitionRequest>,
    ) -> Result<Response<ReadPartitionResponse>, Status> {
        self.authenticate(&request, "ReadPartition")?.may_read_partitions()?;
        let request = request.into_inner();
        let after = validate::position("after", request.after)?;
        let page = HistoryStore::read_partition(&self.store, request.partition, after, request.limit)
            .await
            .inspect_err(|err| self.count_store_error(err, metrics::operation::READ_PARTITION))
            .map_err(Error::from)?;
        Ok(Response::new(page))
    }

    async fn heads(&self, request: Request<HeadsRequest>) -> Result<Response<HeadsResponse>, Status> {
        self.authenticate(&request, "Heads")?.may_read_partitions()?;
        let heads = HistoryStore::heads(&self.store)
            .await
            .inspect_err(|err| self.count_store_error(err, metrics::operation::HEADS))
            .map_err(Error::from)?;
        Ok(Response::new(HeadsResponse { heads }))
    }
}
