//! `notifier publish-batch`: the events of a JSON Lines file, sent in `PublishBatch` calls.

use std::collections::HashMap;
use std::io::Read;

use anyhow::Context;
use notify_proto::pb::{PublishBatchRequest, PublishRequest, PublishResult, publish_result};
use prost::Message;
use serde_json::value::RawValue;

use super::{DEFAULT_ADDR, authorize, connect};

/// Arguments of `notifier publish-batch`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishBatchArgs {
    /// gRPC address of the notifier.
    #[arg(long, env = "NOTIFIER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// JSON Lines file of events, one object per line with `channel`, `type`, `data` (any JSON
    /// value, sent byte for byte) and optionally `user_id` and `idempotency_key`. `-` reads
    /// standard input. The whole input is read and checked before the first call, so it is held
    /// in memory: split files larger than the memory at hand.
    #[arg(long, default_value = "-")]
    pub file: String,
    /// API key, sent as `authorization: Bearer <key>`; needed when the notifier has
    /// `PUBLISHER_KEYS`.
    #[arg(long, env = "NOTIFY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// One line of a `publish-batch` input file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine<'a> {
    channel: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    idempotency_key: String,
}

/// Returns the bytes of an input file as text.
///
/// # Errors
/// Names the line and byte offset of the first bytes that are not UTF-8.
pub fn utf8_text(bytes: &[u8]) -> anyhow::Result<&str> {
    std::str::from_utf8(bytes).map_err(|err| {
        let offset = err.valid_up_to();
        let line = 1 + bytes[..offset].iter().filter(|&&byte| byte == b'\n').count();
        anyhow::anyhow!("line {line} is not UTF-8 text (byte {offset} of the input); save the file as UTF-8")
    })
}

/// Reads every event of a JSON Lines text, skipping blank lines and a byte order mark, and
/// returns each with its line number.
///
/// # Errors
/// Names the first line that is not an event object, and why.
pub fn parse_event_lines(text: &str) -> anyhow::Result<Vec<(usize, PublishRequest)>> {
    let mut events = Vec::new();
    // A byte order mark, which some editors write at the start of a UTF-8 file, is not part of
    // the first line's JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let event: EventLine<'_> = serde_json::from_str(line).with_context(|| {
            format!(
                "line {number} is not an event: write one JSON object per line with channel, type, data and \
                 optionally user_id and idempotency_key"
            )
        })?;
        let request = PublishRequest {
            channel: event.channel,
            r#type: event.event_type,
            data: event.data.get().to_owned(),
            user_id: event.user_id,
            idempotency_key: event.idempotency_key,
        };
        events.push((number, request));
    }
    Ok(events)
}

/// Reads the events of `args.file`, sends them in `PublishBatch` calls of at most
/// `MAX_BATCH_EVENTS` events and 4 MiB, in file order, and prints one line per event:
/// `{"line":…,"id":…,"position":…,"duplicate":…}`, or `{"line":…,"code":…,"message":…}` for an
/// event that was not published. Once an event of a channel fails, the channel's later events
/// are not sent, in this call or the next ones, and are reported as `Aborted`.
///
/// # Errors
/// Fails before sending anything when a line is not an event, at once when a call fails, and
/// after sending everything when an event was not published.
pub async fn publish_batch(args: PublishBatchArgs) -> anyhow::Result<()> {
    let (source, bytes) = if args.file == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("read the events from standard input")?;
        ("standard input".to_owned(), bytes)
    } else {
        let bytes = std::fs::read(&args.file).with_context(|| format!("read the events from {}", args.file))?;
        (args.file.clone(), bytes)
    };
    let text = utf8_text(&bytes).with_context(|| format!("read the events from {source}"))?;
    let events = parse_event_lines(text)?;
    anyhow::ensure!(
        !events.is_empty(),
        "{source} contains no events; write one JSON object per line"
    );
    let mut client = connect(&args.addr).await?;
    let mut stopped = Stopped::new();
    let mut failed = 0;
    for call in batches(&events, crate::service::MAX_BATCH_EVENTS, crate::MIN_REQUEST_LIMIT) {
        // An event whose channel stopped in an earlier call is not sent, as the notifier does
        // within one call, so that the split into calls does not change what is published.
        let send: Vec<bool> = call
            .iter()
            .map(|(_, event)| !stopped.contains_key(&event.channel))
            .collect();
        let batch: Vec<PublishRequest> = call
            .iter()
            .zip(&send)
            .filter(|(_, send)| **send)
            .map(|((_, event), _)| event.clone())
            .collect();
        let results = if batch.is_empty() {
            Vec::new()
        } else {
            let (first, last) = (call[0].0, call[call.len() - 1].0);
            let mut request = tonic::Request::new(PublishBatchRequest { events: batch });
            authorize(&mut request, args.api_key.as_deref())?;
            match client.publish_batch(request).await {
                Ok(response) => response.into_inner().results,
                Err(status) if status.code() == tonic::Code::OutOfRange => anyhow::bail!(
                    "publish-batch failed at line {first}: {:?}: {}; nothing from line {first} on was sent: the call \
                     holds only the event of line {first}, which is too large for the notifier: shorten its data or \
                     raise the notifier's MAX_PAYLOAD_BYTES",
                    status.code(),
                    status.message(),
                ),
                Err(status) => anyhow::bail!(
                    "publish-batch failed at line {first}: {:?}: {}; the events before line {first} were sent, and \
                     those of lines {first} to {last} {}: send the events again from line {first}, with idempotency \
                     keys to avoid duplicates",
                    status.code(),
                    status.message(),
                    if call_may_have_published(status.code()) {
                        "may or may not have been published"
                    } else {
                        "were not published"
                    },
                ),
            }
        };
        for (output, ok) in outcomes(call, &send, results, &mut stopped) {
            if !ok {
                failed += 1;
            }
            println!("{output}");
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} events were not published", events.len());
    Ok(())
}

/// Channels whose events stopped, each with the line of its first event that was not published.
type Stopped = HashMap<String, usize>;

/// Returns whether a `PublishBatch` call that ended with `code` may have published some events:
/// no response came from the service, because the connection failed or time ran out.
fn call_may_have_published(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

/// Returns the output line of each event of a call, and whether the event was published.
/// `send` marks the events that were sent and `results` contains their results, in order. The events
/// not sent, and those the notifier aborted, are reported against the line of their channel's
/// first failed event. Every failure but an idempotency conflict, which publishes nothing, stops
/// the channel's later events.
fn outcomes(
    call: &[(usize, PublishRequest)],
    send: &[bool],
    results: Vec<PublishResult>,
    stopped: &mut Stopped,
) -> Vec<(serde_json::Value, bool)> {
    let mut results = results.into_iter();
    let mut outputs = Vec::with_capacity(call.len());
    for ((line, event), &sent) in call.iter().zip(send) {
        let line = *line;
        let outcome = if sent {
            results.next().and_then(|result| result.outcome)
        } else {
            None
        };
        let output = match outcome {
            Some(publish_result::Outcome::Published(response)) => {
                let output = serde_json::json!({
                    "line": line,
                    "id": response.id,
                    "position": response.position,
                    "duplicate": response.duplicate,
                });
                outputs.push((output, true));
                continue;
            }
            Some(publish_result::Outcome::Error(error)) => {
                let code = tonic::Code::from_i32(error.code);
                match (code, stopped.get(&event.channel)) {
                    (tonic::Code::Aborted, Some(&first)) => aborted(line, &event.channel, first),
                    _ => {
                        if code != tonic::Code::AlreadyExists {
                            stopped.entry(event.channel.clone()).or_insert(line);
                        }
                        serde_json::json!({"line": line, "code": format!("{code:?}"), "message": error.message})
                    }
                }
            }
            None => match stopped.get(&event.channel) {
                Some(&first) if !sent => aborted(line, &event.channel, first),
                _ => {
                    stopped.entry(event.channel.clone()).or_insert(line);
                    serde_json::json!({"line": line, "code": "Unknown", "message": "the notifier returned no outcome; \
                        check whether the event was published with History before you send it again"})
                }
            },
        };
        outputs.push((output, false));
    }
    outputs
}

/// Output line of an event left out because its channel's event at line `first` failed.
fn aborted(line: usize, channel: &str, first: usize) -> serde_json::Value {
    let message = format!(
        "line {first}, on channel {channel:?}, was not published, so this later event of the channel was not \
         either, to keep the channel's order; publish the channel's events again from line {first}"
    );
    serde_json::json!({"line": line, "code": "Aborted", "message": message})
}

/// Splits the events, in order, into the events of `PublishBatch` calls: at most `max_events`
/// each, and at most `max_bytes` encoded, the request limit that every notifier accepts. An
/// event that alone is larger goes in a call of its own, which the notifier rejects unless its
/// `MAX_PAYLOAD_BYTES` makes room for it.
fn batches(events: &[(usize, PublishRequest)], max_events: usize, max_bytes: usize) -> Vec<&[(usize, PublishRequest)]> {
    let mut calls = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, (_, event)) in events.iter().enumerate() {
        // The event's field in the PublishBatchRequest: its tag, length and message.
        let len = event.encoded_len();
        let field = 1 + prost::length_delimiter_len(len) + len;
        if index > start && (index - start == max_events || bytes + field > max_bytes) {
            calls.push(&events[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += field;
    }
    if start < events.len() {
        calls.push(&events[start..]);
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_keep_data_bytes() {
        let text = concat!(
            r#"{"channel":"news","type":"post.created","data":{ "title" : "שלום, עולם" }}"#,
            "\n\n",
            r#"{"channel":"user:7","type":"notice","data":[1, 2],"user_id":"7","idempotency_key":"k-2"}"#,
            "\n",
        );
        let events = parse_event_lines(text).expect("valid lines");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0, 1);
        assert_eq!(events[0].1.data, r#"{ "title" : "שלום, עולם" }"#);
        assert_eq!(events[1].0, 3);
        assert_eq!(events[1].1.data, "[1, 2]");
        assert_eq!(events[1].1.user_id, "7");
        assert_eq!(events[1].1.idempotency_key, "k-2");
    }

    #[test]
    fn bad_event_line_is_named() {
        let text = "{\"channel\":\"news\",\"type\":\"a\",\"data\":1}\n{\"channel\":\"news\",\"data\":1}\n";
        let err = parse_event_lines(text).expect_err("second line has no type");
        let message = format!("{err:#}");
        assert!(message.starts_with("line 2 is not an event"), "{message}");
        assert!(message.contains("missing field `type`"), "{message}");
    }

    fn event(channel: &str, data_bytes: usize) -> PublishRequest {
        PublishRequest {
            channel: channel.into(),
            r#type: "t".into(),
            data: "1".repeat(data_bytes),
            ..PublishRequest::default()
        }
    }

    /// Returns the number of events in each call `batches` makes of `events`.
    fn call_sizes(events: &[(usize, PublishRequest)]) -> Vec<usize> {
        batches(events, crate::service::MAX_BATCH_EVENTS, crate::MIN_REQUEST_LIMIT)
            .iter()
            .map(|call| call.len())
            .collect()
    }

    #[test]
    fn batches_fit_the_request_limit() {
        let events: Vec<(usize, PublishRequest)> = (1..=250).map(|line| (line, event("news", 60_000))).collect();
        let calls = batches(&events, crate::service::MAX_BATCH_EVENTS, crate::MIN_REQUEST_LIMIT);
        assert_eq!(calls.iter().map(|call| call.len()).sum::<usize>(), 250);
        assert!(calls.len() > 3, "{} calls", calls.len());
        let mut next_line = 1;
        for call in &calls {
            assert_eq!(call[0].0, next_line);
            next_line += call.len();
            let request = PublishBatchRequest {
                events: call.iter().map(|(_, event)| event.clone()).collect(),
            };
            assert!(
                request.encoded_len() <= crate::MIN_REQUEST_LIMIT,
                "{}",
                request.encoded_len()
            );
        }
    }

    #[test]
    fn batches_hold_at_most_max_events() {
        let events: Vec<(usize, PublishRequest)> = (1..=250).map(|line| (line, event("news", 10))).collect();
        assert_eq!(call_sizes(&events), vec![100, 100, 50]);
    }

    #[test]
    fn oversized_event_goes_alone() {
        let events = vec![(1, event("a", 10)), (2, event("b", 5_000_000)), (3, event("c", 10))];
        assert_eq!(call_sizes(&events), vec![1, 1, 1]);
    }

    #[test]
    fn byte_order_mark_and_crlf_are_accepted() {
        let text = "\u{feff}{\"channel\":\"news\",\"type\":\"a\",\"data\":1}\r\n{\"channel\":\"news\",\"type\":\"a\",\"data\":2}\r\n";
        let events = parse_event_lines(text).expect("valid lines");
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].1.data, "2");
    }

    #[test]
    fn invalid_utf8_names_line() {
        let err = utf8_text(b"{}\n{}\n{\"data\":\"\xff\"}\n").expect_err("not UTF-8");
        assert_eq!(
            err.to_string(),
            "line 3 is not UTF-8 text (byte 15 of the input); save the file as UTF-8"
        );
    }

    fn published(position: u64) -> PublishResult {
        PublishResult {
            outcome: Some(publish_result::Outcome::Published(notify_proto::pb::PublishResponse {
                id: format!("id-{position}"),
                position,
                duplicate: false,
            })),
        }
    }

    fn error(code: tonic::Code) -> PublishResult {
        PublishResult {
            outcome: Some(publish_result::Outcome::Error(notify_proto::pb::PublishError {
                code: code as i32,
                message: "from the notifier".into(),
                retry_after_ms: 0,
            })),
        }
    }

    #[test]
    fn failed_channel_stops_in_later_calls() {
        let mut stopped = Stopped::new();
        let first = vec![
            (1, event("a", 1)),
            (2, event("a", 1)),
            (3, event("a", 1)),
            (4, event("b", 1)),
        ];
        let results = vec![
            published(1),
            error(tonic::Code::ResourceExhausted),
            error(tonic::Code::Aborted),
            published(1),
        ];
        let outputs = outcomes(&first, &[true; 4], results, &mut stopped);
        let ok: Vec<bool> = outputs.iter().map(|(_, ok)| *ok).collect();
        assert_eq!(ok, vec![true, false, false, true]);
        assert_eq!(outputs[1].0["code"], "ResourceExhausted");
        assert_eq!(outputs[2].0["code"], "Aborted");
        assert!(
            outputs[2].0["message"]
                .as_str()
                .unwrap_or_default()
                .contains("again from line 2"),
            "{}",
            outputs[2].0
        );

        // The next call leaves out the rest of channel a.
        let second = vec![(5, event("a", 1)), (6, event("b", 1))];
        let send: Vec<bool> = second.iter().map(|(_, e)| !stopped.contains_key(&e.channel)).collect();
        assert_eq!(send, vec![false, true]);
        let outputs = outcomes(&second, &send, vec![published(2)], &mut stopped);
        assert_eq!(outputs[0].0["code"], "Aborted");
        assert!(!outputs[0].1);
        assert_eq!(outputs[1].0["position"], 2);
    }

    #[test]
    fn idempotency_conflict_does_not_stop_the_channel() {
        let mut stopped = Stopped::new();
        let call = vec![(1, event("a", 1)), (2, event("a", 1))];
        let outputs = outcomes(
            &call,
            &[true; 2],
            vec![error(tonic::Code::AlreadyExists), published(3)],
            &mut stopped,
        );
        assert!(stopped.is_empty());
        assert!(outputs[1].1);
    }

    #[test]
    fn missing_result_is_a_failure() {
        let mut stopped = Stopped::new();
        let call = vec![(1, event("a", 1)), (2, event("b", 1))];
        let outputs = outcomes(&call, &[true; 2], vec![published(1)], &mut stopped);
        assert!(outputs[0].1);
        assert!(!outputs[1].1);
        assert_eq!(outputs[1].0["code"], "Unknown");
    }
}
