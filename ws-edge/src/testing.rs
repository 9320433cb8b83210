//! Test doubles shared by the unit tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use notify_proto::history::{HistoryError, HistoryStore};
use notify_proto::pb::{Event, ReadPartitionResponse};
use tokio::sync::Semaphore;

/// Returns an event of `channel` at `seq` in `partition` whose payload names the sequence.
pub fn event(partition: u32, seq: u64, channel: &str) -> Event {
    Event {
        id: format!("e{seq}"),
        partition,
        seq,
        channel: channel.into(),
        r#type: "test.event".into(),
        data: format!(r#"{{"seq":{seq}}}"#),
        ts_ms: 1,
        ..Event::default()
    }
}

/// A store of record over a list of events, with an optional gate that holds reads until the
/// test releases them, and a count of reads.
#[derive(Default)]
pub struct VecHistory {
    events: Mutex<Vec<Event>>,
    /// Events removed by retention: the store reports `oldest` above them.
    oldest: Mutex<Option<u64>>,
    /// When set, each read waits for one permit.
    gate: Option<Arc<Semaphore>>,
    /// Number of `read_partition` calls.
    pub reads: AtomicUsize,
}

impl VecHistory {
    /// Creates a store holding `events`.
    pub fn new(events: Vec<Event>) -> Self {
        Self {
            events: Mutex::new(events),
            ..Self::default()
        }
    }

    /// Creates a store whose reads each wait for a permit of `gate`.
    pub fn gated(events: Vec<Event>, gate: Arc<Semaphore>) -> Self {
        Self {
            gate: Some(gate),
            ..Self::new(events)
        }
    }

    /// Stores more events, as a commit would.
    pub fn push(&self, events: impl IntoIterator<Item = Event>) {
        self.events.lock().expect("lock").extend(events);
    }

    /// Removes the events below `oldest`, as retention would.
    pub fn trim_below(&self, oldest: u64) {
        self.events.lock().expect("lock").retain(|event| event.seq >= oldest);
        *self.oldest.lock().expect("lock") = Some(oldest);
    }

    fn partition_events(&self, partition: u32) -> Vec<Event> {
        let events = self.events.lock().expect("lock");
        events
            .iter()
            .filter(|event| event.partition == partition)
            .cloned()
            .collect()
    }
}

#[async_trait]
impl HistoryStore for VecHistory {
    async fn read_partition(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<ReadPartitionResponse, HistoryError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate stays open").forget();
        }
        let stored = self.partition_events(partition);
        let head = stored.iter().map(|event| event.seq).max().unwrap_or(0);
        let oldest = self
            .oldest
            .lock()
            .expect("lock")
            .unwrap_or_else(|| stored.first().map_or(0, |event| event.seq));
        let events = stored
            .into_iter()
            .filter(|event| event.seq > after)
            .take(limit as usize)
            .collect();
        Ok(ReadPartitionResponse { events, head, oldest })
    }

    async fn heads(&self) -> Result<Vec<u64>, HistoryError> {
        let events = self.events.lock().expect("lock");
        let partitions = events.iter().map(|event| event.partition + 1).max().unwrap_or(1);
        let head = |partition| {
            events
                .iter()
                .filter(|e| e.partition == partition)
                .map(|e| e.seq)
                .max()
                .unwrap_or(0)
        };
        Ok((0..partitions).map(head).collect())
    }
}
