//! The single-process mode keeps its history in the SQLite file across restarts, and keeps the
//! development secret of its data directory.

use anyhow::Context;
use e2e::binaries::{self, Process};
use e2e::client::Client;
use e2e::env::work_dir;
use notify_proto::pb::HistoryRequest;
use notify_proto::pb::notifier_client::NotifierClient;
use std::path::Path;

async fn start(data_dir: &Path, run: usize) -> anyhow::Result<Process> {
    let vars = [
        ("NOTIFY_DATA_DIR", data_dir.display().to_string()),
        ("NOTIFIER_LISTEN", "127.0.0.1:0".to_owned()),
        ("EDGE_LISTEN", "127.0.0.1:0".to_owned()),
        ("EDGE_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let log = data_dir.with_extension(format!("run{run}.log"));
    binaries::start("notify-standalone", &[], &vars, &["grpc", "http"], log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_history_and_secret() -> anyhow::Result<()> {
    let data_dir = work_dir()
        .join("data")
        .join(format!("restart_{}", uuid::Uuid::new_v4().simple()));

    // First run: publish three events.
    let mut first = start(&data_dir, 1).await?;
    let mut client = NotifierClient::connect(format!("http://{}", first.addr("grpc")?)).await?;
    let mut ids = Vec::new();
    for n in 0..3 {
        let request = notify_proto::pb::PublishRequest {
            channel: "news".into(),
            r#type: "post.created".into(),
            data: format!(r#"{{"n":{n},"title":"כותרת"}}"#),
            ..Default::default()
        };
        ids.push(client.publish(request).await?.into_inner().id);
    }
    let secret = std::fs::read_to_string(data_dir.join("dev-secret")).context("dev secret written")?;
    first.kill().await;

    // Second run: the history is still there, and tokens of the same secret still work.
    let second = start(&data_dir, 2).await?;
    let mut client = NotifierClient::connect(format!("http://{}", second.addr("grpc")?)).await?;
    let request = HistoryRequest {
        channel: "news".into(),
        since: 0,
        limit: 10,
    };
    let history = client.history(request).await?.into_inner();
    let stored: Vec<&str> = history.events.iter().map(|event| event.id.as_str()).collect();
    assert_eq!(stored, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(history.events[2].data, r#"{"n":2,"title":"כותרת"}"#);
    assert_eq!(std::fs::read_to_string(data_dir.join("dev-secret"))?, secret);

    let token = e2e::token::sign(&e2e::token::claims("dev", &[]), secret.trim());
    let mut socket = Client::connect_with_token(&format!("ws://{}/ws", second.addr("http")?), &token).await?;
    let answer = socket.subscribe_since("news", serde_json::json!(0)).await?;
    assert_eq!(answer["type"], "subscribed", "answer: {answer}");
    for id in &ids {
        assert_eq!(socket.recv().await?["id"], serde_json::Value::from(id.as_str()));
    }

    drop(second);
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}
