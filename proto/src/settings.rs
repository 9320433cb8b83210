//! Parsers for setting values that both services share, for clap's `value_parser`.

use std::time::Duration;

/// Parses a duration given as whole seconds (`90`) or with a unit (`500ms`, `90s`, `15m`, `24h`,
/// `7d`).
///
/// # Errors
/// Fails on any other text, with a message that shows both forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|err| {
        format!("{err}; write whole seconds (`90`) or a number with a unit (`500ms`, `90s`, `15m`, `24h`, `7d`)")
    })
}

/// Parses a whole number of at least 1.
///
/// # Errors
/// Fails on zero and on text that is not a whole number.
pub fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(value) => Ok(value),
        Err(err) => Err(format!("{err}; write a whole number of at least 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_seconds_and_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 24 * 3600)));
        let err = parse_duration("soon").expect_err("no number");
        assert!(err.contains("write whole seconds"), "{err}");
    }

    #[test]
    fn positive_rejects_zero_and_text() {
        assert_eq!(parse_positive("3"), Ok(3));
        assert_eq!(parse_positive("0"), Err("must be at least 1".to_owned()));
        assert!(parse_positive("many").is_err());
    }
}
