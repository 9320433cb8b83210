//! The open-files limit, which caps how many sockets one process can hold.

use anyhow::Context;

/// Raises the soft open-files limit to the hard limit and returns the new soft limit.
///
/// # Errors
/// Fails when the limit cannot be read or set.
pub fn raise_open_files_limit() -> anyhow::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("raise the open-files limit (RLIMIT_NOFILE)")
}

/// Checks that `sockets` sockets and a margin for other descriptors fit under `limit`.
///
/// # Errors
/// Fails with the numbers when they do not fit.
pub fn check_socket_budget(sockets: usize, limit: u64) -> anyhow::Result<()> {
    const MARGIN: u64 = 256;
    let needed = sockets as u64 + MARGIN;
    if needed > limit {
        anyhow::bail!(
            "{sockets} sockets need about {needed} open files but the limit is {limit}; \
             use fewer sockets or raise the hard limit (ulimit -Hn)"
        );
    }
    Ok(())
}
