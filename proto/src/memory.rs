//! The in-process stream of the single-process mode: one bounded buffer per partition, with the
//! same ordering and retention rules as a Redis stream capped by `MAXLEN`.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::log::{AppendReport, Cursor, LogError, LogReader, LogWriter, RangePage};
use crate::pb::Event;

/// An in-process stream of `partitions` partitions. Each partition keeps its newest `max_len`
/// events; appending to a full partition drops its oldest event, as `XADD MAXLEN` does, and readers
/// that fall behind recover the dropped events from the store.
pub struct MemoryLog {
    partitions: Vec<Mutex<Partition>>,
    max_len: usize,
    appended: Notify,
}

#[derive(Default)]
struct Partition {
    events: VecDeque<Event>,
    last_seq: u64,
}

impl MemoryLog {
    /// Creates an empty stream. `max_len` is at least 1.
    pub fn new(partitions: u32, max_len: usize) -> Self {
        Self {
            partitions: (0..partitions).map(|_| Mutex::default()).collect(),
            max_len: max_len.max(1),
            appended: Notify::new(),
        }
    }

    fn partition(&self, partition: u32) -> Result<std::sync::MutexGuard<'_, Partition>, LogError> {
        let slot = self.partitions.get(partition as usize).ok_or_else(|| {
            LogError::Unavailable(format!(
                "partition {partition} does not exist; there are {}",
                self.partitions.len()
            ))
        })?;
        // A panic while holding the lock cannot leave a partition half-written: every mutation
        // is a single push or pop.
        Ok(slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn collect(&self, cursors: &[Cursor], count: usize) -> Result<Vec<Event>, LogError> {
        let mut out = Vec::new();
        for cursor in cursors {
            let partition = self.partition(cursor.partition)?;
            out.extend(after(&partition.events, cursor.after).take(count).cloned());
        }
        Ok(out)
    }
}

fn after(events: &VecDeque<Event>, seq: u64) -> impl Iterator<Item = &Event> {
    let start = events.partition_point(|event| event.seq <= seq);
    events.range(start..)
}

#[async_trait]
impl LogWriter for MemoryLog {
    async fn append(&self, partition: u32, events: &[Event]) -> Result<AppendReport, LogError> {
        let mut report = AppendReport::default();
        {
            let mut log = self.partition(partition)?;
            for event in events {
                if event.seq <= log.last_seq {
                    report.skipped += 1;
                    continue;
                }
                if log.events.len() == self.max_len {
                    log.events.pop_front();
                }
                log.last_seq = event.seq;
                log.events.push_back(event.clone());
                report.appended += 1;
            }
        }
        if report.appended > 0 {
            self.appended.notify_waiters();
        }
        Ok(report)
    }

    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        Ok(self.partition(partition)?.last_seq)
    }
}

#[async_trait]
impl LogReader for MemoryLog {
    async fn read(&self, cursors: &[Cursor], block: Duration, count: usize) -> Result<Vec<Event>, LogError> {
        // Register for the wake-up before looking, so an append between the look and the wait
        // is not missed.
        let appended = self.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let events = self.collect(cursors, count)?;
        if !events.is_empty() {
            return Ok(events);
        }
        if tokio::time::timeout(block, appended).await.is_err() {
            return Ok(Vec::new());
        }
        self.collect(cursors, count)
    }

    async fn range(&self, partition: u32, after_seq: u64, limit: usize) -> Result<RangePage, LogError> {
        let log = self.partition(partition)?;
        Ok(RangePage {
            events: after(&log.events, after_seq).take(limit).cloned().collect(),
            first_seq: log.events.front().map_or(0, |event| event.seq),
        })
    }

    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        Ok(self.partition(partition)?.last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            id: format!("e{seq}"),
            ..Event::default()
        }
    }

    #[tokio::test]
    async fn append_skips_old_sequences_and_trims() {
        let log = MemoryLog::new(2, 3);
        let report = LogWriter::append(&log, 1, &[event(1), event(2), event(2), event(3), event(4)]).await;
        assert_eq!(
            report.expect("partition exists"),
            AppendReport {
                appended: 4,
                skipped: 1
            }
        );
        let page = log.range(1, 0, 10).await.expect("partition exists");
        assert_eq!(page.first_seq, 2);
        assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn read_wakes_on_append() {
        let log = std::sync::Arc::new(MemoryLog::new(1, 10));
        let reader = log.clone();
        let read = tokio::spawn(async move {
            reader
                .read(&[Cursor { partition: 0, after: 0 }], Duration::from_secs(5), 10)
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        LogWriter::append(&*log, 0, &[event(1)])
            .await
            .expect("partition exists");
        let events = read.await.expect("reader task").expect("partition exists");
        assert_eq!(events.len(), 1);
    }

    #[tokio::test]
    async fn unknown_partition_is_an_error() {
        let log = MemoryLog::new(1, 10);
        assert!(LogReader::last_seq(&log, 5).await.is_err());
    }
}
