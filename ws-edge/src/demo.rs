//! The demo page served at `/`: plain HTML and JavaScript embedded in the binary, no build step.

use serde::Serialize;

/// The page: connects to `/ws` on the same host, subscribes, shows events and reconnects.
pub const INDEX_HTML: &str = include_str!("../static/index.html");

/// Settings the page reads from `GET /demo/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoConfig {
    /// Shell command that publishes to a channel; the page replaces `{channel}`.
    pub publish_command: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_uses_camel_case() {
        let config = DemoConfig {
            publish_command: "publish {channel}".into(),
        };
        let json = serde_json::to_string(&config).expect("config serializes");
        assert_eq!(json, r#"{"publishCommand":"publish {channel}"}"#);
    }

    #[test]
    fn page_loads_nothing_external() {
        assert!(!INDEX_HTML.contains("http://"));
        assert!(!INDEX_HTML.contains("https://"));
        assert!(INDEX_HTML.contains("/demo/config"));
    }
}
