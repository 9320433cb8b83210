//! The `notify.v1.Notifier` gRPC service.

use std::sync::Arc;

use notify_proto::channel::{partition_of, validate_channel};
use notify_proto::history::{HistoryStore, MAX_PAGE};
use notify_proto::pb::notifier_server::Notifier;
use notify_proto::pb::{
    HeadsRequest, HeadsResponse, HistoryRequest, HistoryResponse, PublishRequest, PublishResponse,
    ReadPartitionRequest, ReadPartitionResponse,
};
use tonic::{Request, Response, Status};

use crate::apikey::{ApiKeys, Caller};
use crate::committer::Publisher;
use crate::error::Error;
use crate::limits::{self, Counters, PublishLimiter};
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
    counters: Arc<Counters>,
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
            counters: Arc::default(),
            keys: Arc::default(),
        }
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

    /// Returns the counters of rejected publishes.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Checks the caller's rate, validates the request and waits for its commit.
    async fn publish_checked(
        &self,
        request: Request<PublishRequest>,
        caller: &Caller,
    ) -> Result<PublishResponse, Error> {
        self.limiter.check(&limits::rate_key(&request, caller.key_hash()))?;
        let trace = validate::trace_context(request.metadata());
        let event = validate::publish_request(request.into_inner(), trace, self.max_payload_bytes)?;
        let partition = partition_of(&event.channel, self.store.partitions());
        self.publisher.publish(partition, event).await
    }
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let caller = self.authenticate(&request, "Publish")?;
        caller.may_publish(&request.get_ref().channel)?;
        match self.publish_checked(request, &caller).await {
            Ok(response) => Ok(Response::new(response)),
            Err(err) => {
                self.counters.record(&err);
                Err(err.into())
            }
        }
    }

    async fn history(&self, request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let caller = self.authenticate(&request, "History")?;
        caller.may_read_channel(&request.get_ref().channel)?;
        let request = request.into_inner();
        validate_channel(&request.channel).map_err(|err| Error::InvalidArgument(format!("channel {err}")))?;
        let limit = match request.limit {
            0 => DEFAULT_HISTORY_LIMIT,
            limit => limit.min(MAX_PAGE),
        };
        let page = self
            .store
            .history(&request.channel, request.since, limit)
            .await
            .map_err(|err| {
                tracing::warn!(error = %err, "history read failed");
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
        let page = HistoryStore::read_partition(&self.store, request.partition, request.after, request.limit)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(page))
    }

    async fn heads(&self, request: Request<HeadsRequest>) -> Result<Response<HeadsResponse>, Status> {
        self.authenticate(&request, "Heads")?.may_read_partitions()?;
        let heads = HistoryStore::heads(&self.store).await.map_err(Error::from)?;
        Ok(Response::new(HeadsResponse { heads }))
    }
}
