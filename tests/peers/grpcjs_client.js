#!/usr/bin/env node
// Test peer: a @grpc/grpc-js Greeter client that leaks, pools or closes its connections.
//
// Usage: node grpcjs_client.js {leak,pool,close,dial} --target HOST:PORT --count N
//                              [--interval S] [--max-lifetime S] [--deadline S] [--log FILE]
//                              [--tls-ca CERT.pem] [--pace S]
//
// --target may be unix:PATH or unix-abstract:NAME (a Unix socket) as well.
//
// - leak:  N clients created one after another (--pace seconds apart), one RPC each,
//          never closed; each its own connection (a local subchannel pool).
// - pool:  one client, N RPCs every --interval seconds, never closed.
// - close: N times: create a client, one RPC, client.close().
// - dial:  N times: create a client, one RPC with a --deadline, client.close(); a failed
//          RPC is logged to --log as a logfmt line (logrus's layout: time, level, pid,
//          msg) in grpc-js's own words, e.g. "Deadline exceeded after 1.502s".
//
// Prints DONE when its work is done, then stays alive (holding whatever it left open)
// until SIGTERM/SIGINT or --max-lifetime seconds, so a test decides when it ends.
// With --tls-ca the channels are TLS, trusting that certificate (the server's own).
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const RPC_TIMEOUT_MS = 5000;
// grpc-js shares one connection among clients to the same target through its global
// subchannel pool; a local pool gives every client its own connection. The proxy is
// disabled so that an http_proxy in the environment cannot reroute the RPCs.
const CHANNEL_OPTIONS = {
  'grpc.use_local_subchannel_pool': 1,
  'grpc.enable_http_proxy': 0,
};

function parseArgs(argv) {
  const args = { mode: argv[0], interval: 0.2, maxLifetime: 120, deadline: 5, pace: 0 };
  for (let i = 1; i < argv.length; i += 2) {
    const value = argv[i + 1];
    switch (argv[i]) {
      case '--target': args.target = value; break;
      case '--count': args.count = Number(value); break;
      case '--interval': args.interval = Number(value); break;
      case '--max-lifetime': args.maxLifetime = Number(value); break;
      case '--deadline': args.deadline = Number(value); break;
      case '--log': args.log = value; break;
      case '--tls-ca': args.tlsCa = value; break;
      case '--pace': args.pace = Number(value); break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  if (!['leak', 'pool', 'close', 'dial'].includes(args.mode) || !args.target
      || !Number.isInteger(args.count) || !(args.pace >= 0)) {
    throw new Error('usage: grpcjs_client.js {leak,pool,close,dial} --target HOST:PORT --count N');
  }
  return args;
}

const definition = protoLoader.loadSync(path.join(__dirname, 'greeter.proto'));
const { Greeter } = grpc.loadPackageDefinition(definition).helloworld;

let credentials = null;  // set in main: insecure, or TLS with --tls-ca

function newClient(target) {
  return new Greeter(target, credentials, CHANNEL_OPTIONS);
}

function sayHello(client, name, timeoutMs = RPC_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    client.sayHello({ name }, { deadline: Date.now() + timeoutMs }, (err, reply) => {
      if (err) reject(err);
      else if (reply.message !== `Hello ${name}`) reject(new Error(`unexpected reply ${reply.message}`));
      else resolve();
    });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const args = parseArgs(process.argv.slice(2));
  credentials = args.tlsCa
    ? grpc.credentials.createSsl(require('fs').readFileSync(args.tlsCa))
    : grpc.credentials.createInsecure();
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => process.exit(0));
  const kept = []; // referenced until exit so nothing is garbage-collected
  if (args.mode === 'leak') {
    for (let i = 0; i < args.count; i++) {
      const client = newClient(args.target);
      kept.push(client);
      await sayHello(client, `leak-${i}`);
      if (args.pace && i < args.count - 1) await sleep(args.pace * 1000);
    }
  } else if (args.mode === 'pool') {
    const client = newClient(args.target);
    kept.push(client);
    for (let i = 0; i < args.count; i++) {
      if (i) await sleep(args.interval * 1000);
      await sayHello(client, `pool-${i}`);
    }
  } else if (args.mode === 'dial') {
    const fs = require('fs');
    for (let i = 0; i < args.count; i++) {
      if (i) await sleep(args.interval * 1000);
      const client = newClient(args.target);
      try {
        await sayHello(client, `dial-${i}`, args.deadline * 1000);
      } catch (err) {
        const msg = `SayHello failed: ${err.message}`.replace(/"/g, "'");
        const line = `time="${new Date().toISOString()}" level=error pid=${process.pid}`
          + ` target=${args.target} msg="${msg}"\n`;
        if (args.log) fs.appendFileSync(args.log, line);
      }
      client.close();
    }
  } else {
    for (let i = 0; i < args.count; i++) {
      const client = newClient(args.target);
      await sayHello(client, `close-${i}`);
      client.close();
    }
  }
  console.log('DONE');
  globalThis.keptClients = kept;
  // The timer also keeps the event loop, and so the process, alive after DONE.
  setTimeout(() => process.exit(0), args.maxLifetime * 1000);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
