//! Parsers for setting values that both services share, for clap's `value_parser`, and the
//! start-up error that names a setting's environment variable next to its flag.

use std::ffi::OsStr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};

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

/// Parses a text that must not be empty or only whitespace, such as a secret.
///
/// # Errors
/// Fails on empty text.
pub fn parse_non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(text.to_owned())
}

/// Adds the environment variable to clap's message about an invalid value, so that
/// `STREAM_PARTITIONS=0` reports `'--stream-partitions <N>' (environment variable
/// STREAM_PARTITIONS)`. Clap names only the flag, even when the value came from the variable.
/// Other errors, and values of arguments without a variable, are returned unchanged.
pub fn name_variable(mut err: clap::Error, command: &clap::Command) -> clap::Error {
    if !matches!(err.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
        return err;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    // Clap renders the argument as `--long <VALUE_NAME>`.
    let long = arg.split_whitespace().next().unwrap_or(arg).trim_start_matches("--");
    let Some(variable) = variable_of(command, long) else {
        return err;
    };
    let named = format!("{arg} (environment variable {variable})");
    err.insert(ContextKind::InvalidArg, ContextValue::String(named));
    err
}

/// Returns the environment variable of the argument `--long`, in `command` or its subcommands.
fn variable_of(command: &clap::Command, long: &str) -> Option<String> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(clap::Arg::get_env)
        .map(OsStr::to_string_lossy)
        .map(String::from)
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|subcommand| variable_of(subcommand, long))
        })
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
    fn invalid_value_names_flag_and_variable() {
        let command = clap::Command::new("svc")
            .arg(
                clap::Arg::new("partitions")
                    .long("stream-partitions")
                    .env("TEST_SETTINGS_PARTITIONS")
                    .value_parser(clap::value_parser!(u32).range(1..=4096)),
            )
            .subcommand(
                clap::Command::new("serve").arg(
                    clap::Arg::new("queue")
                        .long("publish-queue")
                        .env("TEST_SETTINGS_QUEUE")
                        .value_parser(parse_positive),
                ),
            );
        let err = command
            .clone()
            .try_get_matches_from(["svc", "--stream-partitions", "0"])
            .expect_err("0 is out of range");
        let message = name_variable(err, &command).to_string();
        assert!(message.contains("--stream-partitions"), "{message}");
        assert!(
            message.contains("environment variable TEST_SETTINGS_PARTITIONS"),
            "{message}"
        );
        assert!(message.contains("1..=4096"), "{message}");

        let err = command
            .clone()
            .try_get_matches_from(["svc", "serve", "--publish-queue", "0"])
            .expect_err("0 is rejected");
        let message = name_variable(err, &command).to_string();
        assert!(
            message.contains("environment variable TEST_SETTINGS_QUEUE"),
            "{message}"
        );
        assert!(message.contains("must be at least 1"), "{message}");

        let err = command
            .clone()
            .try_get_matches_from(["svc", "--unknown"])
            .expect_err("unknown flag");
        let unknown = err.to_string();
        assert_eq!(name_variable(err, &command).to_string(), unknown);
    }

    #[test]
    fn non_empty_rejects_blank_text() {
        assert_eq!(parse_non_empty("s3cret"), Ok("s3cret".to_owned()));
        assert_eq!(parse_non_empty(" "), Err("must not be empty".to_owned()));
        assert!(parse_non_empty("").is_err());
    }

    #[test]
    fn positive_rejects_zero_and_text() {
        assert_eq!(parse_positive("3"), Ok(3));
        assert_eq!(parse_positive("0"), Err("must be at least 1".to_owned()));
        assert!(parse_positive("many").is_err());
    }
}
