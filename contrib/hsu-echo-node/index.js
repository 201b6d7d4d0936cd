// hsu.echo.v1.Echo in Node.js: `node index.js` under a kernel (a unit's
// command) or standalone. lib/hsu.js serves Core, health and reflection
// beside it and registers with the kernel.
'use strict';

const path = require('node:path');
const hsu = require('./lib/hsu');

const VERSION = require('./package.json').version;
const instanceId = process.env.HSU_INSTANCE_ID || 'standalone';

function reply(message) {
  return { message, instance_id: instanceId, pid: process.pid };
}

const echo = {
  Echo(call, callback) {
    const { message, delay_ms: delayMs } = call.request;
    setTimeout(() => callback(null, reply(message)), delayMs || 0);
  },
  EchoStream(call) {
    const { message, count, interval_ms: intervalMs } = call.request;
    let i = 0;
    const next = () => {
      if (i >= count || call.cancelled) {
        call.end();
        return;
      }
      call.write(reply(`${message} ${i}`));
      i += 1;
      setTimeout(next, intervalMs || 0);
    };
    next();
  },
  Collect(call, callback) {
    const parts = [];
    call.on('data', (request) => parts.push(request.message));
    call.on('end', () => callback(null, reply(parts.join(' '))));
  },
};

hsu.run({
  services: [{ name: 'hsu.echo.v1.Echo', implementation: echo }],
  protos: ['hsu_echo/v1/echo.proto'],
  protoDirs: [path.join(__dirname, 'proto')],
  version: VERSION,
});
