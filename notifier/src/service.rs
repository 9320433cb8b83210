//! The `notify.v1.Notifier` gRPC service.

use notify_proto::channel::{partition_of, validate_channel};
use notify_proto::history::{HistoryStore, MAX_PAGE};
use notify_proto::pb::notifier_server::Notifier;
use notify_proto::pb::{
    HeadsRequest, HeadsResponse, HistoryRequest, HistoryResponse, PublishRequest, PublishResponse,
    ReadPartitionRequest, ReadPartitionResponse,
};
use tonic::{Request, Response, Status};

use crate::committer::Publisher;
use crate::error::Error;
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
}

impl NotifierService {
    /// Creates the service over the committers' publisher and the store.
    pub fn new(publisher: Publisher, store: Store, max_payload_bytes: usize) -> Self {
        Self {
            publisher,
            store,
            max_payload_bytes,
        }
    }
}

#[tonic::async_trait]
impl Notifier for NotifierService {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let trace = validate::trace_context(request.metadata());
        let event = validate::publish_request(request.into_inner(), trace, self.max_payload_bytes)?;
        let partition = partition_of(&event.channel, self.store.partitions());
        let response = self.publisher.publish(partition, event).await?;
        Ok(Response::new(response))
    }

    async fn history(&self, request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
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
        let request = request.into_inner();
        let page = HistoryStore::read_partition(&self.store, request.partition, request.after, request.limit)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(page))
    }

    async fn heads(&self, _request: Request<HeadsRequest>) -> Result<Response<HeadsResponse>, Status> {
        let heads = HistoryStore::heads(&self.store).await.map_err(Error::from)?;
        Ok(Response::new(HeadsResponse { heads }))
    }
}
