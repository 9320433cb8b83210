// Socket.IO 4.8 fan-out server with the Redis Streams adapter, measured by the bench load client.
//
// Clients connect to /socket.io/?EIO=4&transport=websocket and send the token in the connect
// packet's auth payload ({"token": JWT}, HS256). A client emits "subscribe" with
// {channel, since?} and gets "subscribed" with {type, channel, position}. Each event arrives as
// an "event" message whose argument is the frame object the edge would send. `since` is
// accepted but ignored, because this peer does not recover missed events.
//
// Events come in on the trigger port (see ../common.js) and are broadcast with
// io.to(channel).emit, which goes through the adapter's Redis stream.
//
// Environment: REDIS_URL and JWT_SECRET (required), LISTEN and TRIGGER_LISTEN (default
// 127.0.0.1:0). Logs `listening service="http" addr=IP:PORT` and the same for "trigger".
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-streams-adapter");
const jwt = require("jsonwebtoken");
const { readEnv, listen, createTrigger, exitOnSignal } = require("../common.js");

const env = readEnv();

// Last position broadcast per channel, for the "subscribed" reply.
const positions = new Map();

// Checks the token in the connect packet and keeps its subject as the user id.
function authenticate(socket, next) {
  try {
    const claims = jwt.verify(socket.handshake.auth.token, env.jwtSecret, { algorithms: ["HS256"] });
    socket.data.userId = claims.sub;
    next();
  } catch (error) {
    next(new Error("invalid token"));
  }
}

function onConnection(socket) {
  socket.on("subscribe", (request) => {
    const channel = request && typeof request.channel === "string" ? request.channel : null;
    if (!channel) {
      socket.emit("error_frame", { type: "error", code: "bad_request" });
      return;
    }
    socket.join(channel);
    socket.emit("subscribed", { type: "subscribed", channel, position: positions.get(channel) || 0 });
  });
}

async function main() {
  const redis = createClient({ url: env.redisUrl });
  redis.on("error", (error) => console.error(`redis error: ${error.message}`));
  await redis.connect();

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(redis),
    transports: ["websocket"],
    serveClient: false,
  });
  io.use(authenticate);
  io.on("connection", onConnection);

  const trigger = createTrigger((frame) => {
    positions.set(frame.channel, frame.position);
    io.to(frame.channel).emit("event", frame);
  });

  await listen(httpServer, env.listen, "http");
  await listen(trigger, env.triggerListen, "trigger");
  exitOnSignal(() => {
    io.close();
    trigger.close();
    return redis.quit();
  });
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
