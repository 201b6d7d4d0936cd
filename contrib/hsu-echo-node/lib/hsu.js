// An HSU in Node.js: what hsu.worker does for Python, in one file.
//
// serve() starts a @grpc/grpc-js server with your services plus
// hsu.core.v1.Core, grpc.health.v1.Health (with Watch) and server reflection
// (v1 and v1alpha), on HSU_LISTEN or an ephemeral loopback port; registers
// with the kernel at HSU_KERNEL_ADDRESS, sending HSU_INSTANCE_TOKEN as the
// metadata hsu-instance-token; and stops on Core.Shutdown (only from a caller
// that sends the same token) or SIGTERM/SIGINT: health NOT_SERVING,
// Deregister (best effort), calls in flight finish within the grace, exit 0.
// Under a kernel it streams its calls in flight to Kernel.ReportLoad (at
// most every 100 ms) for autoscaling and draining. Without
// HSU_KERNEL_ADDRESS it runs standalone. docs/sdk.md, "In another language",
// is the contract this file follows.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { ReflectionService } = require('@grpc/reflection');
const { HealthImplementation, protoPath: healthProto } = require('grpc-health-check');

const TOKEN_METADATA = 'hsu-instance-token';
const CORE_SERVICE = 'hsu.core.v1.Core';
const HEALTH_SERVICE = 'grpc.health.v1.Health';
const LOG_KEEP = 2000;
const LOAD_REPORT_INTERVAL_MS = 100;
const LEVELS = ['TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', 'ERROR', 'CRITICAL'];
const RUNTIME = `hsu-node/0.1.0 (node ${process.version}, grpc-js ${grpcJsVersion()})`;

function grpcJsVersion() {
  try {
    return require('@grpc/grpc-js/package.json').version;
  } catch {
    return 'unknown';
  }
}

const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

/** Load .proto files (relative to includeDirs) into one package definition. */
function loadProtos(files, includeDirs) {
  return protoLoader.loadSync(files, { ...LOADER_OPTIONS, includeDirs });
}

/** The service definition of a full service name in a package definition. */
function serviceOf(packageDefinition, name) {
  const service = grpc.loadPackageDefinition(packageDefinition);
  const found = name.split('.').reduce((obj, part) => (obj ? obj[part] : undefined), service);
  if (!found || !found.service) {
    throw new Error(`service ${name} is not in the loaded .proto files`);
  }
  return found;
}

function timestamp(ms) {
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

/** Log records: printed as `LEVEL: message` (the kernel adds time and
 * instance) and kept for Core.StreamLogs. */
class Logs {
  constructor(bound) {
    this.records = [];
    this.followers = new Set();
    this.bound = bound;
  }

  log(level, message) {
    const record = {
      time: timestamp(Date.now()),
      level,
      message,
      origin: 'hsu-node',
      extra: this.bound,
      stream: '',
    };
    this.records.push(record);
    if (this.records.length > LOG_KEEP) this.records.shift();
    process.stderr.write(`${level}: ${message}\n`);
    for (const follower of this.followers) follower(record);
  }
}

function levelAtLeast(record, minLevel) {
  if (!minLevel) return true;
  return LEVELS.indexOf(record.level) >= LEVELS.indexOf(minLevel.toUpperCase());
}

function durationMs(duration, fallbackMs) {
  if (!duration) return fallbackMs;
  return Number(duration.seconds || 0) * 1000 + Math.floor((duration.nanos || 0) / 1e6);
}

function kernelCredentials(target) {
  const ca = process.env.HSU_TLS_CA;
  if (!ca || target.startsWith('unix:')) return grpc.credentials.createInsecure();
  const cert = process.env.HSU_TLS_CERT;
  const key = process.env.HSU_TLS_KEY;
  return grpc.credentials.createSsl(
    fs.readFileSync(ca),
    key ? fs.readFileSync(key) : null,
    cert ? fs.readFileSync(cert) : null,
  );
}

/** The handlers of `service`, each counting its call in flight from its
 * start until it ends (`onChange(delta)` at both ends). */
function counted(serviceDefinition, implementation, onChange) {
  const out = {};
  for (const [name, handler] of Object.entries(implementation)) {
    const method = Object.values(serviceDefinition).find((m) => m.originalName === name)
      || serviceDefinition[name];
    if (typeof handler !== 'function' || !method) {
      out[name] = handler;
      continue;
    }
    out[name] = function countedHandler(call, callback) {
      let open = true;
      const end = () => {
        if (open) {
          open = false;
          onChange(-1);
        }
      };
      onChange(+1);
      call.on('cancelled', end);
      if (method.responseStream) {
        call.on('finish', end);
        call.on('close', end);
        call.on('error', end);
        return handler.call(this, call);
      }
      return handler.call(this, call, (err, reply, ...rest) => {
        end();
        callback(err, reply, ...rest);
      });
    };
  }
  return out;
}

/**
 * Serve until Core.Shutdown or a signal, then exit.
 *
 * @param {object} options
 * @param {Array<{name: string, implementation: object}>} options.services
 *   your services: full name (e.g. "hsu.echo.v1.Echo") and handlers
 * @param {string[]} options.protos .proto files (relative to protoDirs) that
 *   define your services; Core's and the Kernel API's are added
 * @param {string[]} options.protoDirs where to find them (and hsu/core/v1/core.proto,
 *   hsu/kernel/v1/kernel.proto)
 * @param {string} [options.version] your code's version
 * @param {number} [options.graceMs] calls in flight get this long when stopping
 *   (unless Shutdown gives a grace)
 * @param {Function} [options.onStopped] called once the server has stopped
 * @returns {Promise<{address: string, instanceId: string, stop: Function, logs: Logs}>}
 */
async function serve(options) {
  const env = process.env;
  const version = options.version || '0';
  const graceDefault = options.graceMs ?? 5000;
  const kernelAddress = env.HSU_KERNEL_ADDRESS || '';
  const token = env.HSU_INSTANCE_TOKEN || '';
  const listen = env.HSU_LISTEN || '127.0.0.1:0';
  const unit = env.HSU_UNIT || '';
  let instanceId = env.HSU_INSTANCE_ID || '';
  const startedAt = timestamp(Date.now());
  const logs = new Logs(Object.fromEntries(Object.entries({ unit, instance: instanceId }).filter(([, v]) => v)));

  // what this server serves (and reflection describes); the Kernel API apart
  const packageDefinition = loadProtos(
    ['hsu/core/v1/core.proto', healthProto, ...options.protos],
    options.protoDirs,
  );
  const kernelDefinition = loadProtos(['hsu/kernel/v1/kernel.proto'], options.protoDirs);
  const interfaces = options.services.map((s) => s.name);
  const server = new grpc.Server();
  let inflight = 0;
  let loadChanged = () => {};
  for (const s of options.services) {
    const definition = serviceOf(packageDefinition, s.name).service;
    const implementation = kernelAddress
      ? counted(definition, s.implementation, (delta) => {
          inflight += delta;
          loadChanged();
        })
      : s.implementation;
    server.addService(definition, implementation);
  }

  let address = '';
  let stopping = null;
  const streams = new Set(); // ends each following StreamLogs call
  const health = new HealthImplementation(
    Object.fromEntries(['', CORE_SERVICE, HEALTH_SERVICE, ...interfaces].map((n) => [n, 'SERVING'])),
  );
  health.addToServer(server);
  new ReflectionService(packageDefinition).addToServer(server);

  const core = {
    Ping(call, callback) {
      callback(null, { payload: call.request.payload, time: timestamp(Date.now()) });
    },
    Info(call, callback) {
      callback(null, {
        unit,
        instance_id: instanceId,
        pid: process.pid,
        version,
        interfaces,
        address,
        started_at: startedAt,
        runtime: RUNTIME,
      });
    },
    Shutdown(call, callback) {
      const sent = call.metadata.get(TOKEN_METADATA)[0];
      if (token && sent !== token) {
        callback({
          code: grpc.status.PERMISSION_DENIED,
          details: `Core.Shutdown: only the kernel that started this HSU may stop it (${TOKEN_METADATA})`,
        });
        return;
      }
      callback(null, { accepted: true });
      const reason = call.request.reason || 'Core.Shutdown';
      setImmediate(() => stop(durationMs(call.request.grace, graceDefault), reason));
    },
    StreamLogs(call) {
      const { tail, follow, min_level: minLevel } = call.request;
      const past = tail ? logs.records.slice(-tail) : [];
      for (const record of past) if (levelAtLeast(record, minLevel)) call.write(record);
      if (!follow || stopping) {
        call.end();
        return;
      }
      const follower = (record) => {
        if (levelAtLeast(record, minLevel)) call.write(record);
      };
      logs.followers.add(follower);
      const done = () => {
        streams.delete(done);
        if (logs.followers.delete(follower)) call.end();
      };
      call.on('cancelled', done);
      call.on('close', done);
      streams.add(done);
    },
  };
  server.addService(serviceOf(packageDefinition, CORE_SERVICE).service, core);

  const port = await new Promise((resolve, reject) => {
    server.bindAsync(listen, grpc.ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(new Error(`cannot listen on ${listen}: ${err.message}`)) : resolve(bound),
    );
  });
  if (listen.startsWith('unix:')) {
    address = listen;
  } else {
    let host = listen.slice(0, listen.lastIndexOf(':'));
    host = { '0.0.0.0': '127.0.0.1', '[::]': '[::1]', '': '127.0.0.1' }[host] ?? host;
    address = `${host}:${port}`;
  }

  const Kernel = kernelAddress ? serviceOf(kernelDefinition, 'hsu.kernel.v1.Kernel') : null;
  const metadata = () => {
    const md = new grpc.Metadata();
    if (token) md.set(TOKEN_METADATA, token);
    return md;
  };

  function callKernel(method, request, timeoutMs) {
    const client = new Kernel(kernelAddress, kernelCredentials(kernelAddress));
    const deadline = Date.now() + timeoutMs;
    return new Promise((resolve, reject) => {
      client.waitForReady(deadline, (readyErr) => {
        if (readyErr) {
          client.close();
          reject(new Error(`kernel at ${kernelAddress} not reachable: ${readyErr.message}`));
          return;
        }
        client[method](request, metadata(), { deadline }, (err, reply) => {
          client.close();
          if (err) reject(err);
          else resolve(reply);
        });
      });
    });
  }

  // Kernel.ReportLoad: one stream, a message when the count moved (at most
  // every LOAD_REPORT_INTERVAL_MS), opened again with backoff if it breaks
  let reportStream = null;
  let reported = -1;
  let reportTimer = null;
  let reportBackoffMs = 100;
  function openReports() {
    if (stopping || !Kernel) return;
    const client = new Kernel(kernelAddress, kernelCredentials(kernelAddress));
    const stream = client.ReportLoad(metadata(), (err) => {
      client.close();
      if (reportStream === stream) reportStream = null;
      if (stopping) return;
      if (err && err.code === grpc.status.PERMISSION_DENIED) {
        logs.log('WARNING', `load reports refused: ${err.details}`);
        return;
      }
      reported = -1;
      setTimeout(openReports, reportBackoffMs).unref();
      reportBackoffMs = Math.min(reportBackoffMs * 2, 5000);
    });
    reportStream = stream;
    sendLoad();
  }
  function sendLoad() {
    reportTimer = null;
    if (!reportStream || inflight === reported) return;
    reported = inflight;
    reportStream.write({ instance_id: instanceId, inflight });
    reportBackoffMs = 100;
  }
  loadChanged = () => {
    if (!reportTimer) reportTimer = setTimeout(sendLoad, LOAD_REPORT_INTERVAL_MS);
  };

  async function stop(graceMs, reason) {
    if (stopping) return stopping;
    stopping = (async () => {
      logs.log('INFO', `stopping: ${reason}`);
      for (const name of ['', CORE_SERVICE, HEALTH_SERVICE, ...interfaces]) {
        health.setStatus(name, 'NOT_SERVING');
      }
      for (const done of streams) done();
      if (reportTimer) clearTimeout(reportTimer);
      if (reportStream) reportStream.end();
      if (Kernel && instanceId) {
        try {
          await callKernel('Deregister', { instance_id: instanceId }, 1000);
        } catch (err) {
          logs.log('DEBUG', `deregister: ${err.message}`);
        }
      }
      await new Promise((resolve) => {
        const force = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      });
      if (options.onStopped) options.onStopped();
    })();
    return stopping;
  }

  if (Kernel) {
    try {
      const reply = await callKernel(
        'Register',
        { instance_id: instanceId, unit, address, interfaces, pid: process.pid, version, metadata: {} },
        10000,
      );
      instanceId = reply.instance_id;
      logs.bound.instance = instanceId;
    } catch (err) {
      server.forceShutdown();
      const code = err.code !== undefined ? `${grpc.status[err.code]}: ` : '';
      throw new Error(`kernel refused: ${code}${err.details || err.message}`);
    }
    logs.log(
      'INFO',
      `registered with kernel at ${kernelAddress} as ${instanceId}, serving ${interfaces.join(', ')} on ${address}`,
    );
    openReports();
  } else {
    logs.log('INFO', `standalone: serving ${interfaces.join(', ')} on ${address}`);
  }
  return {
    address,
    get instanceId() {
      return instanceId;
    },
    logs,
    stop,
  };
}

/** serve(), and exit 0 after a stop (Core.Shutdown, SIGTERM, SIGINT); exit 1
 * with one line when it cannot start. */
function run(options) {
  let hsu = null;
  const onSignal = (sig) => {
    if (hsu) hsu.stop(options.graceMs ?? 5000, sig);
    else process.exit(0);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  serve({ ...options, onStopped: () => process.exit(0) }).then(
    (started) => {
      hsu = started;
    },
    (err) => {
      process.stderr.write(`ERROR: ${err.message}\n`);
      process.exit(1);
    },
  );
}

module.exports = { serve, run, loadProtos, serviceOf, TOKEN_METADATA, RUNTIME, protoDir: path.join(__dirname, '..', 'proto') };
