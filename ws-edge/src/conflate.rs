//! Opt-in conflation: on channels whose name starts with one of `CONFLATE_PREFIXES`, a newer
//! event with the same `key` replaces an older one still waiting in a busy socket's queue.
//!
//! It suits channels where only the latest value of each key matters (scores, prices, presence
//! counters). A client of such a channel may miss intermediate values, but ends with the latest
//! value of every key.

use std::sync::Arc;

use serde::Deserialize;

/// The channel prefixes whose events are conflated.
#[derive(Debug, Clone, Default)]
pub struct Conflation {
    prefixes: Vec<String>,
}

impl Conflation {
    /// Creates the rule from prefixes; surrounding spaces and empty entries are ignored.
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        let prefixes = prefixes
            .into_iter()
            .map(str::trim)
            .filter(|prefix| !prefix.is_empty())
            .map(str::to_owned)
            .collect();
        Self { prefixes }
    }

    /// Returns the conflation key of an event frame: its channel and the top-level string or
    /// number field `key` of its `data`. Returns `None` when the channel is not conflated or the
    /// data has no such field, and such events are never replaced.
    pub fn key_of(&self, channel: &str, frame: &str) -> Option<Arc<str>> {
        if !self.prefixes.iter().any(|prefix| channel.starts_with(prefix.as_str())) {
            return None;
        }
        let parsed: Frame = serde_json::from_str(frame).ok()?;
        let key = match parsed.data?.key? {
            Key::Text(text) => text,
            Key::Number(number) => number.to_string(),
        };
        // NUL cannot occur in a channel name, so channel and key cannot run together ambiguously.
        Some(format!("{channel}\0{key}").into())
    }
}

#[derive(Deserialize)]
struct Frame {
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    key: Option<Key>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Key {
    Text(String),
    Number(serde_json::Number),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comes_from_data_on_conflated_channels() {
        let conflation = Conflation::new(["scores:", " prices:", ""]);
        let frame = r#"{"type":"score","channel":"scores:cup","data":{"key":"match-7","home":2}}"#;
        assert_eq!(
            conflation.key_of("scores:cup", frame).as_deref(),
            Some("scores:cup\0match-7")
        );
        let numeric = r#"{"type":"tick","channel":"prices:eu","data":{"key":42,"price":1.5}}"#;
        assert_eq!(
            conflation.key_of("prices:eu", numeric).as_deref(),
            Some("prices:eu\x0042")
        );
    }

    #[test]
    fn other_events_have_no_key() {
        let conflation = Conflation::new(["scores:"]);
        let frame = r#"{"type":"post","channel":"news","data":{"key":"k"}}"#;
        assert_eq!(conflation.key_of("news", frame), None);
        for data in [
            r#"{"home":2}"#,
            r#"{"key":{"nested":1}}"#,
            r#"{"key":null}"#,
            "[1,2]",
            "3",
        ] {
            let frame = format!(r#"{{"type":"score","channel":"scores:cup","data":{data}}}"#);
            assert_eq!(conflation.key_of("scores:cup", &frame), None, "{data}");
        }
    }
}
