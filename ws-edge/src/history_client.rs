//! The store of record over the notifier's gRPC API: [`HistoryStore`] on `ReadPartition` and
//! `Heads`.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use notify_proto::history::{HistoryError, HistoryStore, MAX_PAGE};
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::{HeadsRequest, ReadPartitionRequest, ReadPartitionResponse};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

/// Time to open the connection to the notifier.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one call to the notifier.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response accepted: a full page of [`MAX_PAGE`] events of up to 64 KiB payload each
/// (the notifier's default payload limit), plus framing, with room for a doubled payload limit.
/// tonic's default of 4 MiB would reject a full page of large events.
const MAX_RESPONSE_BYTES: usize = 2 * (MAX_PAGE as usize) * 66 * 1024;

/// Reads stored events from the notifier.
#[derive(Clone)]
pub struct GrpcHistory {
    client: NotifierClient<Channel>,
    /// `Bearer <NOTIFIER_API_KEY>`, sent with every call when set.
    authorization: Option<MetadataValue<Ascii>>,
}

impl GrpcHistory {
    /// Creates a client of the notifier at `url`. It connects on first use, so the edge starts
    /// before the notifier does; calls fail as unavailable until it is up.
    ///
    /// # Errors
    /// Fails when the URL is invalid.
    ///
    /// # Panics
    /// Panics outside a Tokio runtime, because tonic spawns the connection's worker task here.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid NOTIFIER_URL {url:?}; expected a URL like http://127.0.0.1:50051"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let client = NotifierClient::new(endpoint.connect_lazy()).max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(Self {
            client,
            authorization: None,
        })
    }

    /// Sends `api_key` as `authorization: Bearer <key>` with every call.
    ///
    /// # Errors
    /// Fails when the key is not printable ASCII.
    pub fn with_api_key(mut self, api_key: &str) -> anyhow::Result<Self> {
        let value = format!("Bearer {api_key}")
            .parse()
            .map_err(|_| anyhow::anyhow!("NOTIFIER_API_KEY must be printable ASCII"))?;
        self.authorization = Some(value);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }
}

fn unavailable(status: &tonic::Status) -> HistoryError {
    HistoryError::Unavailable(format!("{:?}: {}", status.code(), status.message()))
}

#[async_trait]
impl HistoryStore for GrpcHistory {
    async fn read_partition(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<ReadPartitionResponse, HistoryError> {
        let request = ReadPartitionRequest {
            partition,
            after,
            limit: limit.min(MAX_PAGE),
        };
        let response = self.client.clone().read_partition(self.request(request)).await;
        response
            .map(tonic::Response::into_inner)
            .map_err(|status| unavailable(&status))
    }

    async fn heads(&self) -> Result<Vec<u64>, HistoryError> {
        let response = self.client.clone().heads(self.request(HeadsRequest {})).await;
        response
            .map(|response| response.into_inner().heads)
            .map_err(|status| unavailable(&status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_url_is_rejected() {
        let err = GrpcHistory::new("not a url")
            .err()
            .map(|err| err.to_string())
            .unwrap_or_default();
        assert!(err.contains("NOTIFIER_URL"), "{err}");
    }

    #[tokio::test]
    async fn absent_notifier_is_unavailable() {
        // Port 1 on the loopback address refuses connections.
        let history = GrpcHistory::new("http://127.0.0.1:1").expect("valid URL");
        let result = history.heads().await;
        assert!(matches!(result, Err(HistoryError::Unavailable(_))), "{result:?}");
    }
}
