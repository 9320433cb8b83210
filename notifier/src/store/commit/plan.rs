//! The decisions of one commit, apart from the SQL that carries them out. A batch holds requests
//! of any partitions. Each request becomes a new event, a duplicate of an earlier event with the
//! same idempotency key, or a key conflict. Once the partitions' heads are locked and read, the
//! new events take the numbers above their partition's head, in batch order.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use notify_proto::pb::Event;
use sha2::{Digest, Sha256};

use super::{Committed, Outcome};
use crate::store::{NewEvent, StoreError};

/// An idempotency key with the caller it belongs to: `(scope, key)`.
pub(super) type ScopedKey = (String, String);

/// Location of the event that first used an idempotency key.
#[derive(Debug, Clone, Copy)]
pub(super) enum Position {
    /// Already stored, at this sequence number.
    Stored(u64),
    /// New in this batch, at this index of [`Plan::fresh`].
    Fresh(usize),
}

/// The event that first used an idempotency key.
#[derive(Debug, Clone)]
pub(super) struct FirstUse {
    pub(super) event_id: String,
    pub(super) position: Position,
    pub(super) fingerprint: String,
}

#[derive(Debug)]
enum Planned {
    Stored {
        id: String,
        position: Position,
        duplicate: bool,
    },
    Conflict {
        key: String,
        first_id: String,
    },
}

/// A new event of the batch, before its sequence number is known.
#[derive(Debug)]
struct Fresh<'a> {
    event: &'a NewEvent,
    partition: u32,
    id: String,
}

/// A row of `idempotency_keys` to insert.
#[derive(Debug)]
pub(super) struct KeyRow {
    pub(super) scope: String,
    pub(super) key: String,
    pub(super) event_id: String,
    pub(super) partition: u32,
    pub(super) seq: u64,
    pub(super) fingerprint: String,
}

/// The rows a transaction writes once the plan has its sequence numbers.
#[derive(Debug)]
pub(super) struct Writes<'a> {
    /// The outcomes to return and the events to insert, sorted by partition and sequence number.
    pub(super) committed: Committed,
    /// The idempotency key of each event in `committed.events`, by the same index.
    pub(super) event_keys: Vec<Option<&'a str>>,
    /// Keys to insert, sorted by scope and key, so that concurrent transactions that insert the
    /// same keys take their index locks in one order and cannot deadlock.
    pub(super) key_rows: Vec<KeyRow>,
    /// The new `last_seq` of each partition that got events, in ascending partition order.
    pub(super) heads: Vec<(u32, u64)>,
}

/// The decisions for one batch before sequence numbers are known.
#[derive(Debug, Default)]
pub(super) struct Plan<'a> {
    /// First use of each scoped key: from the store, or from an earlier request of this batch.
    first_uses: HashMap<ScopedKey, FirstUse>,
    /// New events, in batch order.
    fresh: Vec<Fresh<'a>>,
    planned: Vec<Planned>,
    /// Keys to insert: scoped key, index into `fresh`, fingerprint.
    new_keys: Vec<(ScopedKey, usize, String)>,
}

impl<'a> Plan<'a> {
    /// Starts a plan with the keys the store already holds.
    pub(super) fn new(first_uses: HashMap<ScopedKey, FirstUse>) -> Self {
        Self {
            first_uses,
            ..Self::default()
        }
    }

    /// Decides the next request of the batch, an event of `partition`.
    pub(super) fn add(&mut self, partition: u32, event: &'a NewEvent) {
        let Some(key) = &event.idempotency_key else {
            self.add_fresh(partition, event);
            return;
        };
        let fingerprint = fingerprint(event);
        let scoped = (event.idempotency_scope.clone(), key.clone());
        let planned = match self.first_uses.get(&scoped) {
            Some(first) if first.fingerprint == fingerprint => Planned::Stored {
                id: first.event_id.clone(),
                position: first.position,
                duplicate: true,
            },
            Some(first) => Planned::Conflict {
                key: key.clone(),
                first_id: first.event_id.clone(),
            },
            None => {
                let index = self.add_fresh(partition, event);
                let first = FirstUse {
                    event_id: self.fresh[index].id.clone(),
                    position: Position::Fresh(index),
                    fingerprint: fingerprint.clone(),
                };
                self.new_keys.push((scoped.clone(), index, fingerprint));
                self.first_uses.insert(scoped, first);
                return;
            }
        };
        self.planned.push(planned);
    }

    fn add_fresh(&mut self, partition: u32, event: &'a NewEvent) -> usize {
        let index = self.fresh.len();
        let id = uuid::Uuid::now_v7().to_string();
        self.planned.push(Planned::Stored {
            id: id.clone(),
            position: Position::Fresh(index),
            duplicate: false,
        });
        self.fresh.push(Fresh { event, partition, id });
        index
    }

    /// Returns the partition, id and request of each new event, in batch order.
    pub(super) fn fresh_events(&self) -> impl Iterator<Item = (u32, &str, &'a NewEvent)> {
        self.fresh
            .iter()
            .map(|fresh| (fresh.partition, fresh.id.as_str(), fresh.event))
    }

    /// Assigns each new event the next number above its partition's head, in batch order.
    /// `heads` holds the locked `last_seq` of every partition in the batch.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when a new event's partition has no head, which means its
    /// partition row is missing.
    pub(super) fn finish(self, heads: &BTreeMap<u32, u64>, now_ms: i64) -> Result<Writes<'a>, StoreError> {
        let mut next = heads.clone();
        let mut seqs = Vec::with_capacity(self.fresh.len());
        for fresh in &self.fresh {
            let head = next
                .get_mut(&fresh.partition)
                .ok_or_else(|| StoreError::Corrupt(format!("partition {} has no row", fresh.partition)))?;
            *head += 1;
            seqs.push(*head);
        }
        let seq_at = |position| match position {
            Position::Stored(seq) => seq,
            Position::Fresh(index) => seqs[index],
        };

        let outcomes = self
            .planned
            .into_iter()
            .map(|planned| match planned {
                Planned::Stored {
                    id,
                    position,
                    duplicate,
                } => Outcome::Stored {
                    id,
                    seq: seq_at(position),
                    duplicate,
                },
                Planned::Conflict { key, first_id } => Outcome::Conflict { key, first_id },
            })
            .collect();
        let mut key_rows: Vec<KeyRow> = self
            .new_keys
            .into_iter()
            .map(|((scope, key), index, fingerprint)| KeyRow {
                scope,
                key,
                event_id: self.fresh[index].id.clone(),
                partition: self.fresh[index].partition,
                seq: seqs[index],
                fingerprint,
            })
            .collect();
        key_rows.sort_unstable_by(|a, b| (&a.scope, &a.key).cmp(&(&b.scope, &b.key)));

        let mut order: Vec<usize> = (0..self.fresh.len()).collect();
        order.sort_unstable_by_key(|&index| (self.fresh[index].partition, seqs[index]));
        let events = order
            .iter()
            .map(|&index| {
                let fresh = &self.fresh[index];
                stored_event(fresh.event, &fresh.id, fresh.partition, seqs[index], now_ms)
            })
            .collect();
        let event_keys = order
            .iter()
            .map(|&index| self.fresh[index].event.idempotency_key.as_deref())
            .collect();
        let heads = next
            .into_iter()
            .filter(|(partition, head)| heads.get(partition) != Some(head))
            .collect();
        Ok(Writes {
            committed: Committed { outcomes, events },
            event_keys,
            key_rows,
            heads,
        })
    }
}

fn stored_event(event: &NewEvent, id: &str, partition: u32, seq: u64, ts_ms: i64) -> Event {
    Event {
        id: id.to_owned(),
        partition,
        seq,
        channel: event.channel.clone(),
        r#type: event.event_type.clone(),
        data: event.data.clone(),
        user_id: event.user_id.clone(),
        ts_ms,
        traceparent: event.traceparent.clone(),
        tracestate: event.tracestate.clone(),
    }
}

/// Returns the hex SHA-256 of the fields that make two publishes the same event. Each field is
/// prefixed with its length, so that moving bytes between fields changes the hash.
fn fingerprint(event: &NewEvent) -> String {
    let mut hasher = Sha256::new();
    for field in [&event.channel, &event.event_type, &event.data, &event.user_id] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_event(channel: &str, data: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            channel: channel.into(),
            event_type: "post.created".into(),
            data: data.into(),
            user_id: String::new(),
            idempotency_key: key.map(str::to_owned),
            idempotency_scope: String::new(),
            traceparent: String::new(),
            tracestate: String::new(),
        }
    }

    fn stored_seq(outcome: &Outcome) -> u64 {
        match outcome {
            Outcome::Stored { seq, .. } => *seq,
            Outcome::Conflict { .. } => panic!("expected a stored event, got {outcome:?}"),
        }
    }

    #[test]
    fn fingerprint_separates_fields() {
        let mut a = new_event("news", "1", None);
        a.user_id = "ab".into();
        let mut b = new_event("news", "1a", None);
        b.user_id = "b".into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_eq!(fingerprint(&a).len(), 64);
    }

    #[test]
    fn plan_numbers_events_and_resolves_keys() {
        let batch = [
            new_event("news", "1", Some("k")),
            new_event("news", "2", None),
            new_event("news", "1", Some("k")),
            new_event("news", "other", Some("k")),
        ];
        let mut plan = Plan::default();
        for event in &batch {
            plan.add(7, event);
        }

        let writes = plan.finish(&BTreeMap::from([(7, 10)]), 1000).expect("finish");
        let committed = writes.committed;
        let seqs: Vec<u64> = committed.events.iter().map(|event| event.seq).collect();
        assert_eq!(seqs, vec![11, 12]);

        // The retry returns the first event; the key reused for other data conflicts.
        let first_id = committed.events[0].id.clone();
        assert_eq!(
            committed.outcomes[2],
            Outcome::Stored {
                id: first_id.clone(),
                seq: 11,
                duplicate: true
            }
        );
        assert_eq!(
            committed.outcomes[3],
            Outcome::Conflict {
                key: "k".into(),
                first_id: first_id.clone()
            }
        );

        // One key row, for the first event.
        assert_eq!(writes.key_rows.len(), 1);
        assert_eq!(
            (writes.key_rows[0].seq, writes.key_rows[0].event_id.as_str()),
            (11, first_id.as_str())
        );
        assert_eq!(writes.event_keys, vec![Some("k"), None]);
        assert_eq!(writes.heads, vec![(7, 12)]);
    }

    #[test]
    fn plan_numbers_each_partition_from_its_own_head() {
        let batch = [
            new_event("b", "1", None),
            new_event("a", "2", Some("k")),
            new_event("b", "3", None),
            new_event("a", "4", None),
            new_event("c", "2", Some("k")),
        ];
        let partitions = [5, 2, 5, 2, 9];
        let mut plan = Plan::default();
        for (event, partition) in batch.iter().zip(partitions) {
            plan.add(partition, event);
        }
        // Partition 9 was locked but only holds a conflict, so its head stays.
        let heads = BTreeMap::from([(2, 0), (5, 40), (9, 3)]);
        let writes = plan.finish(&heads, 1000).expect("finish");

        let outcomes: Vec<u64> = writes.committed.outcomes[..4].iter().map(stored_seq).collect();
        assert_eq!(outcomes, vec![41, 1, 42, 2]);
        assert!(matches!(writes.committed.outcomes[4], Outcome::Conflict { .. }));
        let stored: Vec<(u32, u64, &str)> = writes
            .committed
            .events
            .iter()
            .map(|event| (event.partition, event.seq, event.data.as_str()))
            .collect();
        assert_eq!(stored, vec![(2, 1, "2"), (2, 2, "4"), (5, 41, "1"), (5, 42, "3")]);
        assert_eq!(writes.event_keys, vec![Some("k"), None, None, None]);
        assert_eq!(writes.heads, vec![(2, 2), (5, 42)]);
    }

    #[test]
    fn plan_without_head_is_corrupt() {
        let event = new_event("a", "1", None);
        let mut plan = Plan::default();
        plan.add(3, &event);
        assert!(matches!(
            plan.finish(&BTreeMap::new(), 1000),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn key_rows_are_sorted() {
        let batch = [
            new_event("a", "1", Some("z")),
            new_event("a", "2", Some("b")),
            new_event("a", "3", Some("m")),
        ];
        let mut plan = Plan::default();
        for event in &batch {
            plan.add(0, event);
        }
        let writes = plan.finish(&BTreeMap::from([(0, 0)]), 1000).expect("finish");
        let keys: Vec<&str> = writes.key_rows.iter().map(|row| row.key.as_str()).collect();
        assert_eq!(keys, vec!["b", "m", "z"]);
    }
}
