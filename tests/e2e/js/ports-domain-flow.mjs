// The core flow in pure domain mode (issue 8) with one JS SDK package, run by ports.test.mjs in
// a child process whose environment has E2B_DOMAIN, NODE_EXTRA_CA_CERTS and E2B_API_KEY but no
// E2B_API_URL/E2B_SANDBOX_URL. Prints one JSON object with what it saw.
//   node ports-domain-flow.mjs PKG RUN_ID
import { readFileSync } from 'node:fs'

import { openWebSocket } from './ports-ws.mjs'

const [pkg, runId] = process.argv.slice(2)
const { Sandbox } = await import(pkg)
const app = readFileSync(new URL('../python/suite/ports_fixtures/app.py', import.meta.url), 'utf8')
const out = {}

const get = async (url) => {
  const r = await fetch(url)
  return [r.status, await r.text()]
}

const sbx = await Sandbox.create('base', { timeoutMs: 300_000, metadata: { 'e2e-run': runId, sdk: `js-domain-${pkg}` } })
let host
try {
  out.sandboxId = sbx.sandboxId
  out.echo = (await sbx.commands.run('echo $((6 * 7))')).stdout
  await sbx.files.write('/home/user/domain.txt', 'written in domain mode')
  out.read = await sbx.files.read('/home/user/domain.txt')
  await sbx.files.write('/home/user/app.py', app)
  await sbx.commands.run('python3 /home/user/app.py 8000', { background: true })
  host = sbx.getHost(8000)
  out.host = host
  const deadline = Date.now() + 30_000
  for (;;) {
    out.hello = await get(`https://${host}/hello`).catch((e) => [0, String(e)])
    if (out.hello[0] === 200 || Date.now() > deadline) break
    await new Promise((r) => setTimeout(r, 200))
  }
  const ws = await openWebSocket({ url: `https://${host}/ws` })
  out.wsStatus = ws.status
  out.wsEchoed = []
  for (const msg of [Buffer.from('over tls'), Buffer.alloc(70_000, 7)]) {
    ws.send(msg)
    const frame = await ws.recv()
    out.wsEchoed.push(frame.opcode === 2 && Buffer.compare(frame.payload, msg) === 0)
  }
  ws.close()
  const [status, body] = await get(`https://${sbx.getHost(8001)}/`)
  out.closedPort = [status, JSON.parse(body)]
} finally {
  await sbx.kill()
}
const [status, body] = await get(`https://${host ?? sbx.getHost(8000)}/hello`)
out.afterKill = [status, JSON.parse(body)]
console.log(JSON.stringify(out))
