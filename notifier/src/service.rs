//! The `notify.v1.Notifier` gRPC service.

use std::sync::Arc;

use notify_proto::channel::{partition_of, validate_channel};
use notify_proto::history::{HistoryError, HistoryStore, MAX_PAGE};
use notify_proto::pb::notifier_server::Notifier;
use notify_proto::pb::{
    HeadsRequest, HeadsResponse, HistoryRequest, HistoryResponse, PublishRequest, PublishResponse,
    ReadPartitionRequest, ReadPartitionResponse,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::apikey::{ApiKeys, Caller};
use crate::committer::Publisher;
use crate::error::Error;
use crate::limits::{self, PublishLimiter};
use crate::metrics::{self, Metrics};
use crate::spans;
use crate::store::Store;
use crate::validate;

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

    /// Checks the caller's rate, validates the request and waits for its commit.
    async fn publish_checked(
        &self,
        request: Request<PublishRequest>,
        caller: &Caller,
    ) -> Result<PublishResponse, Error> {
        self.limiter.check(&limits::rate_key(&request, caller.key_hash()))?;
        let trace = validate::trace_context(request.metadata());
        // The "event published" line below is this module's only line inside the span.
        let debug_logged = tracing::enabled!(tracing::Level::DEBUG);
        let span = spans::publish(&request.get_ref().channel, &trace, debug_logged);
        let published = self
            .publish_traced(request, trace, caller.idempotency_scope(), &span)
            .instrument(span.clone())
            .await;
        spans::record_outcome(&span, &published);
        published
    }

    /// Validates the request and waits for its commit, inside its `publish` span. The request's
    /// idempotency key belongs to `idempotency_scope`, the caller's.
    async fn publish_traced(
        &self,
        request: Request<PublishRequest>,
        trace: validate::TraceContext,
        idempotency_scope: String,
        span: &tracing::Span,
    ) -> Result<PublishResponse, Error> {
        let event = spans::validate()
            .in_scope(|| validate::publish_request(request.into_inner(), trace, self.max_payload_bytes))?;
        let mut event = spans::stamp(event, span);
        event.idempotency_scope = idempotency_scope;
        let partition = partition_of(&event.channel, self.store.partitions());
        span.record("event.partition", i64::from(partition));
        let response = self.publisher.publish(partition, event).await?;
        tracing::debug!(
            event.id = %response.id,
            event.position = response.position,
            duplicate = response.duplicate,
            "event published"
        );
        Ok(response)
    }
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
        let published = self.publish_checked(request, &caller).await;
        let result = match &published {
            Ok(response) if response.duplicate => metrics::publish_result::DUPLICATE,
            Ok(_) => metrics::publish_result::OK,
            Err(err) => metrics::error_result(err),
        };
        call.finish(result);
        published.map(Response::new).map_err(Status::from)
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
