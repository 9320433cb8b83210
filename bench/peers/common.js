// Helpers shared by the peer servers: their environment, listening with the address logged as
// the bench runner reads it, the trigger port, and the event frame.
"use strict";

const net = require("node:net");
const readline = require("node:readline");
const { randomUUID } = require("node:crypto");

// Reads REDIS_URL and JWT_SECRET (required), LISTEN and TRIGGER_LISTEN (default 127.0.0.1:0).
function readEnv() {
  const { REDIS_URL, JWT_SECRET } = process.env;
  if (!REDIS_URL || !JWT_SECRET) {
    console.error("REDIS_URL or JWT_SECRET is missing; set both in the environment");
    process.exit(2);
  }
  return {
    redisUrl: REDIS_URL,
    jwtSecret: JWT_SECRET,
    listen: process.env.LISTEN || "127.0.0.1:0",
    triggerListen: process.env.TRIGGER_LISTEN || "127.0.0.1:0",
  };
}

// Binds `server` to "host:port" and logs `listening service="<service>" addr=IP:PORT`.
function listen(server, address, service) {
  const colon = address.lastIndexOf(":");
  const host = address.slice(0, colon);
  const port = Number(address.slice(colon + 1));
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      const bound = server.address();
      console.log(`listening service="${service}" addr=${bound.address}:${bound.port}`);
      resolve();
    });
  });
}

// Creates the trigger server: each line is a JSON event {"channel","type","data"}, which becomes
// the frame the edge would send, with the channel's next position, and goes to `onFrame`.
function createTrigger(onFrame) {
  // Positions are counted per channel here, since the trigger is the only publisher.
  const positions = new Map();
  return net.createServer((connection) => {
    readline.createInterface({ input: connection }).on("line", (line) => {
      let event;
      try {
        event = JSON.parse(line);
      } catch (error) {
        console.error(`invalid trigger line, skipped: ${error.message}`);
        return;
      }
      const position = (positions.get(event.channel) || 0) + 1;
      positions.set(event.channel, position);
      onFrame({
        type: event.type,
        channel: event.channel,
        id: randomUUID(),
        position,
        data: event.data,
        ts: Date.now(),
      });
    });
    connection.on("error", () => connection.destroy());
  });
}

// Runs `close` on SIGTERM or SIGINT, then exits.
function exitOnSignal(close) {
  const stop = () => {
    Promise.resolve()
      .then(close)
      .finally(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

module.exports = { readEnv, listen, createTrigger, exitOnSignal };
