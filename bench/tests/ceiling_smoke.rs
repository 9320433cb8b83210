//! Smoke test of the load client and publisher against the in-process ceiling server: a handful
//! of sockets and events, so it finishes in about a second. Benchmarks themselves never run under
//! `cargo test`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bench::client::{Backoff, Fleet, FleetConfig};
use bench::publisher::{OpenLoop, PublishTarget, run_open_loop};
use bench::scenario::channel_names;
use bench::token::TokenMinter;
use bench::wire::Protocol;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceiling_delivers_every_event_once() -> anyhow::Result<()> {
    // Start the ceiling server in this process.
    let ws_listener = TcpListener::bind("127.0.0.1:0").await?;
    let trigger_listener = TcpListener::bind("127.0.0.1:0").await?;
    let (ws_addr, trigger_addr) = (ws_listener.local_addr()?, trigger_listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bench::ceiling::run(ws_listener, trigger_listener, async {
        let _ = stop_rx.await;
    }));

    // Five sockets over three source addresses and two channels.
    let config = FleetConfig {
        server: ws_addr,
        path: "/ws".to_owned(),
        sockets: 5,
        channels: channel_names(2),
        source_addrs: 3,
        connect_concurrency: 2,
        reconnect: false,
        protocol: Protocol::Native,
        backoff: Backoff::default(),
    };
    let minter = TokenMinter::new("smoke-test-secret", Duration::from_secs(60))?;
    let fleet = Fleet::connect(config.clone(), minter).await?;
    assert_eq!(fleet.connect_failures, 0);
    assert_eq!(fleet.connected_per_channel, vec![3, 2]);

    // Ten events per channel at 200 per second.
    let plan = OpenLoop {
        rate: 200.0,
        events: 10,
        channels: config.channels,
    };
    let published = run_open_loop(PublishTarget::Trigger(trigger_addr), &plan, Arc::new(AtomicU64::new(0))).await?;
    assert_eq!(published.acked_count(), 20);
    let expected = fleet.expected_deliveries(&published.acked);
    assert_eq!(expected, 50);
    assert!(fleet.wait_for_deliveries(expected, Duration::from_secs(5)).await);

    // Every socket got every event of its channel once, with a latency recorded for each.
    let report = fleet.finish().await;
    assert_eq!(report.expected_and_lost(&published.acked), (50, 0));
    assert_eq!(report.delivered, 50);
    assert_eq!(report.duplicates, 0);
    assert_eq!(report.gaps(), 0);
    assert_eq!(report.latency.len(), 50);
    assert!(
        report
            .sockets
            .iter()
            .all(|socket| socket.error_frames == 0 && socket.unparsed == 0)
    );

    let _ = stop_tx.send(());
    let slow_consumers = tokio::time::timeout(Duration::from_secs(5), server).await???;
    assert_eq!(slow_consumers, 0);
    Ok(())
}
