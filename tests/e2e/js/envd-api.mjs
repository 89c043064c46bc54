// The envd surface (commands, PTY, files, watchers, signed URLs, a 30 MiB transfer) through the
// real E2B JS SDK: a sandbox of a real server (E2B_API_URL/E2B_SANDBOX_URL/E2B_API_KEY; scripts/test
// runs it with E2B_JS=e2b and e2b-2-50), or a development agent in debug mode:
//   target/debug/soulbox agent --listen 127.0.0.1:49983 &
//   E2B_DEBUG=true E2B_API_KEY=e2b_000... node envd-api.mjs
import { createHash, randomBytes } from 'node:crypto'

const { Sandbox, CommandExitError, FileNotFoundError, NotFoundError } = await import(process.env.E2B_JS ?? 'e2b')
let checks = 0
const check = (cond, what) => {
  if (!cond) throw new Error(`check failed: ${what}`)
  checks++
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

const sbx = await Sandbox.create()
const base = `/tmp/soulbox-sdk-js-${Math.random().toString(36).slice(2, 10)}`

let r = await sbx.commands.run('echo hi; echo err >&2', { envs: { A: '1' } })
check(r.stdout === 'hi\n' && r.stderr === 'err\n', `run ${JSON.stringify(r)}`)
try {
  await sbx.commands.run('exit 5')
  check(false, 'exit 5 must throw')
} catch (e) {
  check(e instanceof CommandExitError && e.exitCode === 5, `exit: ${e}`)
}
r = await sbx.commands.run('whoami; pwd', { user: 'root', cwd: '/tmp' })
check(r.stdout === 'root\n/tmp\n', `user/cwd ${r.stdout}`)
r = await sbx.commands.run("head -c 1048576 /dev/zero | tr '\\0' y")
check(r.stdout.length === 1048576, `1 MiB: ${r.stdout.length}`)

let h = await sbx.commands.run('sleep 0.5; echo bg', { background: true })
const list = await sbx.commands.list()
check(list.some((p) => p.pid === h.pid && p.args[2] === 'sleep 0.5; echo bg'), 'list')
await h.disconnect()
const h2 = await sbx.commands.connect(h.pid)
check((await h2.wait()).stdout === 'bg\n', 'connect after disconnect')
try {
  await sbx.commands.connect(987654)
  check(false, 'connect unknown')
} catch (e) {
  check(e instanceof NotFoundError, `connect unknown: ${e}`)
}

h = await sbx.commands.run('cat', { background: true, stdin: true })
await sbx.commands.sendStdin(h.pid, 'js-stdin')
await sbx.commands.closeStdin(h.pid)
check((await h.wait()).stdout === 'js-stdin', 'stdin')

h = await sbx.commands.run('sleep 20', { background: true })
check(await sbx.commands.kill(h.pid), 'kill')
await h.wait().catch(() => {})
check(!(await sbx.commands.kill(h.pid)), 'kill of an ended command is false')

const chunks = []
const term = await sbx.pty.create({ rows: 12, cols: 34, onData: (d) => chunks.push(Buffer.from(d)) })
await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size\n'))
// Resize only after the first answer (a slow login profile may delay the shell).
for (let i = 0; i < 100 && !Buffer.concat(chunks).toString().includes('12 34'); i++) await sleep(50)
await sbx.pty.resize(term.pid, { rows: 44, cols: 120 })
await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; exit\n'))
await term.wait()
const text = Buffer.concat(chunks).toString()
check(text.includes('12 34') && text.includes('44 120'), `pty: ${JSON.stringify(text)}`)

const w = await sbx.files.write(`${base}/a/b.txt`, 'hello')
check(w.path === `${base}/a/b.txt`, `write ${JSON.stringify(w)}`)
check((await sbx.files.read(`${base}/a/b.txt`)) === 'hello', 'read')
await sbx.files.write([{ path: `${base}/m1`, data: 'a' }, { path: `${base}/m2`, data: 'b' }])
check((await sbx.files.read(`${base}/m2`)) === 'b', 'multi write')
try {
  await sbx.files.read(`${base}/nope`)
  check(false, 'missing read')
} catch (e) {
  check(e instanceof FileNotFoundError, `missing: ${e}`)
}
const entries = await sbx.files.list(base)
check(entries.map((e) => e.name).sort().join(',') === 'a,m1,m2', `list ${entries.map((e) => e.name)}`)
const info = await sbx.files.getInfo(`${base}/a/b.txt`)
check(info.size === 5 && info.type === 'file' && info.permissions === '-rw-r--r--' && info.modifiedTime instanceof Date && info.modifiedTime.getTime() > 0, `info ${JSON.stringify(info)}`)
await sbx.commands.run(`ln -s ${base}/a ${base}/ln`)
const li = await sbx.files.getInfo(`${base}/ln`)
check(li.type === 'symlink' && li.symlinkTarget === `${base}/a`, `symlink ${JSON.stringify(li)}`)
check(await sbx.files.exists(`${base}/a`), 'exists')
check(await sbx.files.makeDir(`${base}/d/e`), 'makeDir')
check(!(await sbx.files.makeDir(`${base}/d/e`)), 'makeDir again')
const mv = await sbx.files.rename(`${base}/m1`, `${base}/d/m1`)
check(mv.path === `${base}/d/m1`, 'rename')
await sbx.files.remove(`${base}/d`)
check(!(await sbx.files.exists(`${base}/d`)), 'remove')

await sbx.files.makeDir(`${base}/w`)
const events = []
const wh = await sbx.files.watchDir(`${base}/w`, (e) => events.push(e), { recursive: true })
await sbx.files.write(`${base}/w/f`, '1')
await sbx.files.remove(`${base}/w/f`)
await sleep(300)
await wh.stop()
const kinds = new Set(events.map((e) => `${e.name}:${e.type}`))
check(kinds.has('f:create') && kinds.has('f:write') && kinds.has('f:remove'), `watch ${[...kinds]}`)

const blob = randomBytes(30 << 20)
await sbx.files.write(`${base}/big`, blob)
const got = await sbx.files.read(`${base}/big`, { format: 'bytes' })
check(createHash('sha256').update(got).digest('hex') === createHash('sha256').update(blob).digest('hex'), '30 MiB round trip')

await sbx.files.remove(base)
if (!process.env.E2B_DEBUG) await sbx.kill()
console.log(`JS API: ${checks} checks passed`)
