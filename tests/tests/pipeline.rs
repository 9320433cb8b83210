//! The path of one event: Publish over gRPC, the store, the stream and the edge, to the sockets
//! subscribed to its channel. Every test runs in both deployment modes.

use anyhow::{Context, ensure};
use e2e::client::{Client, Ending};
use e2e::e2e_test;
use e2e::token;
use notify_proto::pb::PublishRequest;
use notify_proto::protocol::close;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Extracts the raw `data` bytes from an event frame without re-encoding them.
fn raw_data(frame: &str) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let parsed: Frame<'_> = serde_json::from_str(frame).with_context(|| format!("not an event frame: {frame}"))?;
    Ok(parsed.data.get().to_owned())
}

e2e_test!(event_reaches_every_subscriber, |env| {
    let mut first = env.connect("alice").await?;
    let mut second = env.connect("bob").await?;
    let mut bystander = env.connect("carol").await?;
    first.subscribe("news").await?;
    second.subscribe("news").await?;
    bystander.subscribe("sports").await?;

    let published = env.publish("news", "post.created", r#"{"title":"hello"}"#).await?;

    for client in [&mut first, &mut second] {
        let event = client.recv().await?;
        assert_eq!(event["type"], "post.created");
        assert_eq!(event["channel"], "news");
        assert_eq!(event["id"], published.id);
        assert_eq!(event["position"], published.position);
        assert_eq!(event["data"], json!({"title": "hello"}));
        assert!(event["ts"].as_i64().is_some_and(|ts| ts > 0), "ts missing in {event}");
    }
    bystander.expect_nothing_pending().await?;
    Ok(())
});

e2e_test!(connected_frame_names_the_user, |env| {
    let client = env.connect("alice").await?;
    let connected = client.connected.context("connected frame")?;
    assert_eq!(connected["userId"], "alice");
    Ok(())
});

e2e_test!(ping_gets_pong, |env| {
    let mut client = env.connect("alice").await?;
    client.send(json!({"type": "ping"})).await?;
    assert_eq!(client.recv().await?["type"], "pong");
    Ok(())
});

e2e_test!(unsubscribed_socket_stops_receiving, |env| {
    let mut client = env.connect("alice").await?;
    client.subscribe("news").await?;
    client.send(json!({"type": "unsubscribe", "channel": "news"})).await?;
    assert_eq!(client.expect_type("unsubscribed").await?["channel"], "news");

    env.publish("news", "post.created", "{}").await?;
    client.expect_nothing_pending().await?;
    Ok(())
});

e2e_test!(user_channel_is_private, |env| {
    let mut alice = env.connect("alice").await?;
    alice.send(json!({"type": "subscribe", "channel": "user:bob"})).await?;
    let refused = alice.expect_type("error").await?;
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["channel"], "user:bob");

    alice.subscribe("user:alice").await?;
    let published = env.publish("user:alice", "notice", r#"{"n":1}"#).await?;
    assert_eq!(alice.recv().await?["id"], published.id);
    Ok(())
});

e2e_test!(channels_claim_grants_namespaces, |env| {
    let mut without = env.connect("alice").await?;
    without
        .send(json!({"type": "subscribe", "channel": "orders:eu"}))
        .await?;
    assert_eq!(without.expect_type("error").await?["code"], "forbidden");

    let token = token::valid("bob", &["orders:*"]);
    let mut granted = Client::connect_with_token(&env.ws_url(), &token).await?;
    granted.subscribe("orders:eu").await?;
    Ok(())
});

e2e_test!(targeted_event_reaches_only_its_user, |env| {
    let token_alice = token::valid("alice", &["team:*"]);
    let token_bob = token::valid("bob", &["team:*"]);
    let mut alice = Client::connect_with_token(&env.ws_url(), &token_alice).await?;
    let mut bob = Client::connect_with_token(&env.ws_url(), &token_bob).await?;
    alice.subscribe("team:1").await?;
    bob.subscribe("team:1").await?;

    let request = PublishRequest {
        channel: "team:1".into(),
        r#type: "mention".into(),
        data: "{}".into(),
        user_id: "bob".into(),
        ..Default::default()
    };
    let published = env.publish_request(request).await?;
    assert_eq!(bob.recv().await?["id"], published.id);
    alice.expect_nothing_pending().await?;
    Ok(())
});

e2e_test!(missing_token_closes_4001, |env| {
    let mut client = Client::open(&env.ws_url()).await?;
    client.send(json!({"type": "subscribe", "channel": "news"})).await?;
    assert_eq!(client.ending().await?, Ending::Closed(close::NO_TOKEN));
    Ok(())
});

e2e_test!(invalid_tokens_close_4002, |env| {
    let cases = [
        ("bad signature", token::bad_signature("alice")),
        ("alg none", token::alg_none("alice")),
        ("expired", token::expired("alice")),
        ("malformed", "not.a.jwt".to_owned()),
    ];
    for (case, token) in cases {
        let mut client = Client::open(&format!("{}?token={token}", env.ws_url())).await?;
        assert_eq!(
            client.ending().await?,
            Ending::Closed(close::INVALID_TOKEN),
            "case: {case}"
        );
    }
    Ok(())
});

e2e_test!(auth_frame_authenticates, |env| {
    let mut client = Client::open(&env.ws_url()).await?;
    client
        .send(json!({"type": "auth", "token": token::valid("alice", &[])}))
        .await?;
    assert_eq!(client.expect_type("connected").await?["userId"], "alice");
    client.subscribe("news").await?;
    Ok(())
});

e2e_test!(invalid_json_names_data, |env| {
    let request = PublishRequest {
        channel: "news".into(),
        r#type: "post.created".into(),
        data: "{not json".into(),
        ..Default::default()
    };
    let status = env
        .publish_request(request)
        .await
        .expect_err("invalid JSON is rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("data"),
        "message does not name the field: {}",
        status.message()
    );
    Ok(())
});

e2e_test!(oversized_payload_is_rejected, |env| {
    let data = format!(r#"{{"blob":"{}"}}"#, "x".repeat(64 * 1024));
    let request = PublishRequest {
        channel: "news".into(),
        r#type: "post.created".into(),
        data,
        ..Default::default()
    };
    let status = env
        .publish_request(request)
        .await
        .expect_err("oversized payload is rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("data"),
        "message does not name the field: {}",
        status.message()
    );
    Ok(())
});

e2e_test!(invalid_channel_and_type_are_rejected, |env| {
    let cases = [
        ("bad channel!", "post.created", "channel"),
        ("news", "subscribed", "type"),
        ("news", "", "type"),
    ];
    for (channel, event_type, field) in cases {
        let request = PublishRequest {
            channel: channel.into(),
            r#type: event_type.into(),
            data: "{}".into(),
            ..Default::default()
        };
        let status = env
            .publish_request(request)
            .await
            .expect_err("invalid request is rejected");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "case {channel:?} {event_type:?}"
        );
        assert!(
            status.message().contains(field),
            "message does not name {field}: {}",
            status.message()
        );
    }
    Ok(())
});

e2e_test!(hebrew_and_emoji_round_trip, |env| {
    let mut client = env.connect("alice").await?;
    client.subscribe("news").await?;
    let data =
        r#"{"title":"שלום עולם","body":"מה נשמע? 👋🏽 עברית מימין לשמאל","mixed":"abc אבג 123","escaped":"\u05d0"}"#;
    env.publish("news", "post.created", data).await?;
    let frame = client.recv_text().await?;
    assert_eq!(raw_data(&frame)?, data);
    Ok(())
});

/// Returns the frame's text between `"data":` and `,"ts":`, whitespace included, where
/// [`raw_data`] would leave out the whitespace around the value.
fn data_text(frame: &str) -> anyhow::Result<&str> {
    let start = frame.find(",\"data\":").context("frame has no data")? + ",\"data\":".len();
    let end = frame.rfind(",\"ts\":").context("frame has no ts")?;
    frame
        .get(start..end)
        .with_context(|| format!("data out of place in {frame}"))
}

e2e_test!(payload_whitespace_reaches_the_frame, |env| {
    let mut client = env.connect("alice").await?;
    client.subscribe("news").await?;
    let payloads = [" {\"ws\" :  [1 , 2]}\n", "\n\t{\"title\":\"שלום, עולם\"}\r\n  "];
    for data in payloads {
        env.publish("news", "post.created", data).await?;
        let frame = client.recv_text().await?;
        assert_eq!(data_text(&frame)?, data, "frame {frame:?}");
        serde_json::from_str::<Value>(&frame).with_context(|| format!("frame is not JSON: {frame:?}"))?;
    }
    let stored: Vec<String> = env
        .history("news", 0)
        .await?
        .into_iter()
        .map(|event| event.data)
        .collect();
    assert_eq!(stored, payloads);
    Ok(())
});

e2e_test!(hundred_events_arrive_in_order, |env| {
    let mut client = env.connect("alice").await?;
    client.subscribe("ticker").await?;
    let mut positions = Vec::new();
    for n in 0..100 {
        positions.push(
            env.publish("ticker", "tick", &format!(r#"{{"n":{n}}}"#))
                .await?
                .position,
        );
    }
    for (n, position) in positions.iter().enumerate() {
        let event = client.recv().await?;
        assert_eq!(event["data"]["n"], n, "event {n} out of order: {event}");
        assert_eq!(event["position"], *position);
    }
    ensure!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "positions not increasing: {positions:?}"
    );
    Ok(())
});

e2e_test!(subscribed_frame_carries_position, |env| {
    // A first subscriber's delivery shows that the edge has read the event.
    let mut watcher = env.connect("alice").await?;
    assert_eq!(watcher.subscribe("quiet").await?["position"], 0);
    let published = env.publish("quiet", "note", "{}").await?;
    assert_eq!(watcher.recv().await?["id"], published.id);

    let mut client = env.connect("bob").await?;
    let subscribed = client.subscribe("quiet").await?;
    assert_eq!(subscribed["channel"], "quiet");
    assert_eq!(subscribed["position"], published.position);
    Ok(())
});

e2e_test!(resume_replays_missed_events, |env| {
    let mut client = env.connect("alice").await?;
    let since = client.subscribe("feed").await?["position"].clone();
    drop(client);

    let mut missed = Vec::new();
    for n in 0..5 {
        missed.push(env.publish("feed", "item", &format!(r#"{{"n":{n}}}"#)).await?.id);
    }
    let mut client = env.connect("alice").await?;
    let answer = client.subscribe_since("feed", since).await?;
    assert_eq!(answer["type"], "subscribed", "answer: {answer}");
    assert_eq!(answer["recovered"], true);
    for id in &missed {
        assert_eq!(client.recv().await?["id"], Value::from(id.as_str()));
    }
    let live = env.publish("feed", "item", r#"{"n":5}"#).await?;
    assert_eq!(client.recv().await?["id"], live.id);
    Ok(())
});

e2e_test!(position_ahead_of_stream_is_an_error, |env| {
    let mut client = env.connect("alice").await?;
    let answer = client.subscribe_since("feed", json!(1_000_000_000u64)).await?;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "invalid_position");
    let answer = client.subscribe_since("feed", json!("abc")).await?;
    assert_eq!(answer["code"], "invalid_position");
    Ok(())
});

e2e_test!(batch_arrives_in_request_order, |env| {
    use notify_proto::pb::PublishBatchRequest;
    use notify_proto::pb::publish_result::Outcome;

    let mut client = env.connect("alice").await?;
    client.subscribe("news").await?;
    let data: Vec<String> = (0..50).map(|n| format!(r#"{{"n":{n},"title":"חדשות {n}"}}"#)).collect();
    let events = data
        .iter()
        .map(|data| PublishRequest {
            channel: "news".into(),
            r#type: "post.created".into(),
            data: data.clone(),
            ..Default::default()
        })
        .collect();
    let mut publisher = env.publisher().await?;
    let results = publisher
        .publish_batch(PublishBatchRequest { events })
        .await?
        .into_inner()
        .results;
    let mut positions = Vec::new();
    for result in results {
        match result.outcome {
            Some(Outcome::Published(published)) => positions.push(published.position),
            other => anyhow::bail!("an event of the batch was not published: {other:?}"),
        }
    }
    ensure!(positions.len() == 50, "{} results for 50 events", positions.len());
    ensure!(positions.windows(2).all(|pair| pair[1] == pair[0] + 1), "{positions:?}");

    for (sent, position) in data.iter().zip(&positions) {
        let frame = client.recv_text().await?;
        assert_eq!(raw_data(&frame)?, *sent);
        let event: Value = serde_json::from_str(&frame)?;
        assert_eq!(event["position"], *position);
    }
    client.expect_nothing_pending().await?;
    Ok(())
});

e2e_test!(cli_batch_reports_each_line, |env| {
    use std::process::Stdio;

    use tokio::io::AsyncWriteExt;

    let mut client = env.connect("alice").await?;
    client.subscribe("news").await?;
    let hebrew = r#"{ "title" : "שלום, עולם" }"#;
    let input = format!(
        "{{\"channel\":\"news\",\"type\":\"post.created\",\"data\":{hebrew}}}\n\n\
         {{\"channel\":\"news\",\"type\":\"post.created\",\"data\":{{oops}}\n"
    );
    let first_line_only = input.lines().next().context("input line")?.to_owned() + "\n";

    // A line that is not JSON stops the command before anything is sent.
    let cli = e2e::binaries::path("notifier").await?;
    let grpc = format!("http://{}", env.grpc);
    let run = async |input: String| -> anyhow::Result<std::process::Output> {
        let mut child = tokio::process::Command::new(&cli)
            .args(["publish-batch", "--addr", &grpc, "--file", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(input.as_bytes()).await?;
        drop(stdin);
        Ok(child.wait_with_output().await?)
    };
    let rejected = run(input).await?;
    ensure!(!rejected.status.success(), "a bad line was accepted");
    let stderr = String::from_utf8_lossy(&rejected.stderr);
    ensure!(stderr.contains("line 3 is not an event"), "{stderr}");
    client.expect_nothing_pending().await?;

    let sent = run(first_line_only).await?;
    ensure!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let printed: Value = serde_json::from_slice(&sent.stdout)?;
    assert_eq!(printed["line"], 1);
    assert_eq!(printed["duplicate"], false);
    let frame = client.recv_text().await?;
    assert_eq!(raw_data(&frame)?, hebrew);
    let event: Value = serde_json::from_str(&frame)?;
    assert_eq!(event["id"], printed["id"]);
    Ok(())
});
