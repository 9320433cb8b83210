// Plain Node fan-out server: ws + jsonwebtoken + Redis pub/sub, speaking the edge's client
// protocol, measured by the bench load client.
//
// Clients connect to /ws?token=JWT (HS256) and get {"type":"connected",...}. They send
// {"type":"subscribe","channel":c} and get {"type":"subscribed","channel":c,"position":n}, and
// {"type":"ping"} gets {"type":"pong"}. `since` is accepted but ignored, because this peer does
// not recover missed events.
//
// Events come in on the trigger port (see ../common.js). The trigger encodes the frame once and
// PUBLISHes it to the Redis channel of the same name. Each server process SUBSCRIBEs to the
// channels its clients use. It turns each message into one Buffer and sends that Buffer to
// every local subscriber.
//
// Environment: REDIS_URL and JWT_SECRET (required), LISTEN and TRIGGER_LISTEN (default
// 127.0.0.1:0). Logs `listening service="http" addr=IP:PORT` and the same for "trigger".
"use strict";

const http = require("node:http");
const { randomUUID } = require("node:crypto");
const { WebSocketServer } = require("ws");
const { createClient } = require("redis");
const jwt = require("jsonwebtoken");
const { readEnv, listen, createTrigger, exitOnSignal } = require("../common.js");

const env = readEnv();
const MAX_PAYLOAD = 64 * 1024;

// Local subscribers and the last position seen, per channel.
const channels = new Map();

function channelState(name) {
  let state = channels.get(name);
  if (!state) {
    state = { sockets: new Set(), position: 0, redisSubscribed: false };
    channels.set(name, state);
  }
  return state;
}

function deliver(name, message) {
  const state = channelState(name);
  const frame = Buffer.from(message);
  try {
    state.position = Math.max(state.position, JSON.parse(message).position);
  } catch (error) {
    console.error(`invalid frame on channel ${name}: ${error.message}`);
  }
  for (const socket of state.sockets) {
    socket.send(frame, { binary: false });
  }
}

async function subscribe(subscriber, socket, subscriptions, name) {
  const state = channelState(name);
  if (!state.redisSubscribed) {
    state.redisSubscribed = true;
    await subscriber.subscribe(name, (message) => deliver(name, message));
  }
  state.sockets.add(socket);
  subscriptions.add(name);
  socket.send(JSON.stringify({ type: "subscribed", channel: name, position: state.position }));
}

function session(subscriber, socket, userId) {
  const subscriptions = new Set();
  socket.send(JSON.stringify({ type: "connected", userId, connId: randomUUID() }));
  socket.on("message", (raw) => {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (error) {
      socket.send(JSON.stringify({ type: "error", code: "bad_request", message: "frame is not JSON" }));
      return;
    }
    if (frame.type === "ping") {
      socket.send('{"type":"pong"}');
    } else if (frame.type === "subscribe" && typeof frame.channel === "string") {
      subscribe(subscriber, socket, subscriptions, frame.channel).catch((error) => {
        console.error(`subscribe to ${frame.channel} failed: ${error.message}`);
        socket.close(1011);
      });
    } else {
      socket.send(JSON.stringify({ type: "error", code: "unknown_type", message: "not supported" }));
    }
  });
  socket.on("close", () => {
    for (const name of subscriptions) {
      channelState(name).sockets.delete(socket);
    }
  });
}

function userFromRequest(request) {
  const token = new URL(request.url, "http://localhost").searchParams.get("token");
  return jwt.verify(token, env.jwtSecret, { algorithms: ["HS256"] }).sub;
}

async function main() {
  const publisher = createClient({ url: env.redisUrl });
  publisher.on("error", (error) => console.error(`redis error: ${error.message}`));
  await publisher.connect();
  const subscriber = publisher.duplicate();
  subscriber.on("error", (error) => console.error(`redis error: ${error.message}`));
  await subscriber.connect();

  // Verify the token before the upgrade, so nothing is sent to an unauthenticated client.
  const httpServer = http.createServer();
  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_PAYLOAD });
  httpServer.on("upgrade", (request, tcp, head) => {
    let userId;
    try {
      userId = userFromRequest(request);
    } catch (error) {
      tcp.end("HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n");
      return;
    }
    wss.handleUpgrade(request, tcp, head, (socket) => session(subscriber, socket, userId));
  });

  const trigger = createTrigger((frame) => {
    publisher
      .publish(frame.channel, JSON.stringify(frame))
      .catch((error) => console.error(`publish to ${frame.channel} failed: ${error.message}`));
  });

  await listen(httpServer, env.listen, "http");
  await listen(trigger, env.triggerListen, "trigger");
  exitOnSignal(() => {
    wss.close();
    trigger.close();
    httpServer.close();
    return Promise.allSettled([publisher.quit(), subscriber.quit()]);
  });
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
