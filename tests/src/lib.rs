//! Helpers for the end-to-end tests: they build and start the real binaries against the machine's
//! PostgreSQL and Redis (or in single-process mode), and drive them over gRPC and WebSocket.
//!
//! Layout:
//! - [`binaries`]: builds the binaries once and starts them, reading back their bound addresses.
//! - [`env`]: [`env::TestEnv`], one isolated deployment per test (own database, own stream keys).
//! - [`client`]: a WebSocket client that speaks the client protocol.
//! - [`raw_socket`]: a bare WebSocket, for control over the TCP socket and the frames.
//! - [`redis_server`]: a Redis of one test's own, for faults such as a restart or `FLUSHALL`.
//! - [`token`]: mints client tokens, valid and forged.
//!
//! Settings: `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) is the
//! database used to create one database per test; `TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) is the shared Redis, in which each test uses its own key prefix;
//! `E2E_PATIENCE_SECS` (default 10) is how long a test waits for an expected frame.
//!
//! On a machine without PostgreSQL or Redis the distributed-mode tests print why and pass
//! without running, so the suite still works with nothing but cargo. `E2E_REQUIRE_SERVICES=1`
//! (set by CI) turns that into a failure.

pub mod binaries;
pub mod client;
pub mod env;
pub mod raw_socket;
pub mod redis_server;
pub mod token;

use std::time::Duration;

/// How long a test waits for something that should happen, from `E2E_PATIENCE_SECS`.
pub fn patience() -> Duration {
    let secs = std::env::var("E2E_PATIENCE_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// Defines one test per deployment mode, running the same body against a fresh [`env::TestEnv`]:
/// `mod $name { async fn distributed(); async fn standalone(); }`.
#[macro_export]
macro_rules! e2e_test {
    ($name:ident, |$env:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($env: &$crate::env::TestEnv) -> ::anyhow::Result<()> $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn distributed() -> ::anyhow::Result<()> {
                match $crate::env::TestEnv::start_or_skip($crate::env::Mode::Distributed).await? {
                    Some(env) => body(&env).await,
                    None => Ok(()),
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() -> ::anyhow::Result<()> {
                let env = $crate::env::TestEnv::start($crate::env::Mode::Standalone).await?;
                body(&env).await
            }
        }
    };
}
