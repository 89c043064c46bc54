// Sandbox ports (issue 8) from the official JS SDK, once per pinned version: a server inside the
// sandbox, bound to its loopback, reached through the gateway with the E2b-Sandbox-Id/-Port
// headers (URL mode, E2B_SANDBOX_URL) and through getHost(port) in domain mode (a child process
// with only E2B_DOMAIN + NODE_EXTRA_CA_CERTS, so every request is https://…<domain>).
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { after, before, describe, test } from 'node:test'
import { promisify } from 'node:util'

import { openWebSocket } from './ports-ws.mjs'

const require = createRequire(import.meta.url)
const run = promisify(execFile)

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) {
    throw new Error(`${name} is not set: point the suite at a running soulbox serve or run scripts/test`)
  }
}
const DOMAIN = process.env.E2B_DOMAIN
const NODE_CA = process.env.NODE_EXTRA_CA_CERTS
const STRICT = ['1', 'true', 'yes'].includes((process.env.SOULBOX_E2E_STRICT ?? '').toLowerCase())
const APP = readFileSync(new URL('../python/suite/ports_fixtures/app.py', import.meta.url), 'utf8')
const RUN_ID = `jsports${Date.now()}`
const GATEWAY = process.env.E2B_SANDBOX_URL.replace(/\/$/, '')

const routed = (id, port, extra = {}) => ({ 'E2b-Sandbox-Id': id, 'E2b-Sandbox-Port': String(port), ...extra })

for (const pkg of ['e2b', 'e2b-2-50']) {
  const { Sandbox } = await import(pkg)
  const version = require(`${pkg}/package.json`).version

  describe(`ports with e2b@${version} (${pkg})`, () => {
    let sbx

    before(async () => {
      sbx = await Sandbox.create('base', { timeoutMs: 300_000, metadata: { 'e2e-run': RUN_ID, sdk: `js-${version}` } })
      await sbx.files.write('/home/user/app.py', APP)
      await sbx.commands.run('python3 /home/user/app.py 8000', { background: true })
      const deadline = Date.now() + 30_000
      for (;;) {
        const r = await fetch(`${GATEWAY}/hello`, { headers: routed(sbx.sandboxId, 8000) })
        await r.arrayBuffer()
        if (r.status === 200) break
        assert.ok(Date.now() < deadline, `app never answered: ${r.status}`)
        await new Promise((res) => setTimeout(res, 200))
      }
    })

    after(async () => {
      if (sbx) await Sandbox.kill(sbx.sandboxId).catch(() => {})
    })

    test('HTTP through the routing headers', async () => {
      const r = await fetch(`${GATEWAY}/hello`, { headers: routed(sbx.sandboxId, 8000) })
      assert.equal(r.status, 200)
      assert.equal(await r.text(), 'hello from the sandbox')
      const body = randomBytes(150_000)
      const echo = await fetch(`${GATEWAY}/echo`, { method: 'POST', body, headers: routed(sbx.sandboxId, 8000) })
      assert.equal(echo.status, 200)
      assert.ok(Buffer.from(await echo.arrayBuffer()).equals(body))
    })

    test('server-sent events are streamed', async () => {
      const gate = `/tmp/sse-gate-${pkg}-${Date.now()}`
      const r = await fetch(`${GATEWAY}/sse?gate=${gate}`, { headers: routed(sbx.sandboxId, 8000) })
      assert.equal(r.headers.get('content-type'), 'text/event-stream')
      const reader = r.body.getReader()
      const first = await reader.read()
      assert.equal(Buffer.from(first.value).toString(), 'data: 0\n\n')
      await sbx.commands.run(`touch ${gate}`)
      let rest = ''
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        rest += Buffer.from(value).toString()
      }
      assert.equal(rest, 'data: 1\n\ndata: 2\n\n')
    })

    test('WebSocket through the routing headers', async () => {
      const ws = await openWebSocket({ url: `${GATEWAY}/ws`, headers: routed(sbx.sandboxId, 8000) })
      try {
        assert.equal(ws.status, 101)
        for (const msg of [Buffer.from('hello'), randomBytes(100_000)]) {
          ws.send(msg)
          const frame = await ws.recv()
          assert.equal(frame.opcode, 2)
          assert.ok(Buffer.compare(frame.payload, msg) === 0)
        }
      } finally {
        ws.close()
      }
    })

    test('closed port and dead sandbox', async () => {
      const r = await fetch(`${GATEWAY}/`, { headers: routed(sbx.sandboxId, 8002) })
      assert.equal(r.status, 502)
      assert.deepEqual(await r.json(), {
        sandboxId: sbx.sandboxId,
        message: 'The sandbox is running but port is not open',
        port: 8002,
        code: 502,
      })
      const dead = await Sandbox.create('base', { timeoutMs: 60_000, metadata: { 'e2e-run': RUN_ID } })
      await Sandbox.kill(dead.sandboxId)
      const gone = await fetch(`${GATEWAY}/`, { headers: routed(dead.sandboxId, 8000) })
      assert.equal(gone.status, 502)
      assert.match((await gone.json()).message, /was not found/)
    })

    test('getHost in domain mode', { skip: !DOMAIN && !STRICT && 'needs a server in domain mode (E2B_DOMAIN)' }, async () => {
      assert.ok(DOMAIN && NODE_CA, 'E2B_DOMAIN and NODE_EXTRA_CA_CERTS must be set (domain mode)')
      assert.equal(sbx.getHost(8000), `8000-${sbx.sandboxId}.${DOMAIN}`)
      const env = { ...process.env, E2B_DOMAIN: DOMAIN, NODE_EXTRA_CA_CERTS: NODE_CA }
      delete env.E2B_API_URL
      delete env.E2B_SANDBOX_URL
      const flow = new URL('./ports-domain-flow.mjs', import.meta.url).pathname
      const { stdout } = await run(process.execPath, [flow, pkg, RUN_ID], { env, timeout: 240_000 })
      const out = JSON.parse(stdout.trim().split('\n').pop())
      const id = out.sandboxId
      assert.equal(out.echo, '42\n')
      assert.equal(out.read, 'written in domain mode')
      assert.equal(out.host, `8000-${id}.${DOMAIN}`)
      assert.deepEqual(out.hello, [200, 'hello from the sandbox'])
      assert.equal(out.wsStatus, 101)
      assert.deepEqual(out.wsEchoed, [true, true])
      assert.deepEqual(out.closedPort, [
        502,
        { sandboxId: id, message: 'The sandbox is running but port is not open', port: 8001, code: 502 },
      ])
      assert.equal(out.afterKill[0], 502)
      assert.match(out.afterKill[1].message, /was not found/)
    })
  })
}
