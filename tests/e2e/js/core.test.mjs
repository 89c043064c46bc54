// The core SDK flow from the official JS SDK, run once per pinned version (latest and 2.50.0,
// installed side by side through an npm alias), against the server in E2B_API_URL/E2B_SANDBOX_URL.
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { createRequire } from 'node:module'
import { after, before, describe, test } from 'node:test'

import { startRecordingProxy } from './recording-proxy.mjs'

const require = createRequire(import.meta.url)

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) {
    throw new Error(`${name} is not set: point the suite at a running soulbox serve or run scripts/test`)
  }
}

const SDKS = [
  { pkg: 'e2b', v2Routes: true },
  { pkg: 'e2b-2-50', v2Routes: false },
]
const UNKNOWN_ID = 'zzzzzzzzzzzzzzzzzzzz'
const RUN_ID = `js${Date.now()}`

for (const { pkg, v2Routes } of SDKS) {
  const sdk = await import(pkg)
  const version = require(`${pkg}/package.json`).version
  const { Sandbox, CommandExitError, FileNotFoundError, NotFoundError, AuthenticationError } = sdk

  describe(`e2b@${version} (${pkg})`, () => {
    const created = new Set()
    const create = async (opts = {}) => {
      const sbx = await Sandbox.create('base', {
        timeoutMs: 300_000,
        ...opts,
        metadata: { 'e2e-run': RUN_ID, sdk: `js-${version}`, ...(opts.metadata ?? {}) },
      })
      created.add(sbx.sandboxId)
      return sbx
    }
    let sbx

    before(async () => {
      sbx = await create({ envs: { SBX_CREATE_VAR: 'from create' } })
    })

    after(async () => {
      for (const id of created) {
        await Sandbox.kill(id).catch(() => {})
      }
    })

    test('create and connect use the routes of this SDK version', async () => {
      const proxy = await startRecordingProxy(process.env.E2B_API_URL)
      try {
        const s = await create({ apiUrl: proxy.url })
        assert.match(s.sandboxId, /^[a-z0-9]{20}$/)
        const again = await Sandbox.connect(s.sandboxId, { apiUrl: proxy.url })
        assert.equal((await again.commands.run('echo connected')).stdout, 'connected\n')
        await Sandbox.kill(s.sandboxId)
        const prefix = v2Routes ? '/v2' : ''
        const seen = proxy.seen().map(([m, p]) => `${m} ${p}`)
        assert.ok(seen.includes(`POST ${prefix}/sandboxes`), seen.join(', '))
        assert.ok(seen.includes(`POST ${prefix}/sandboxes/${s.sandboxId}/connect`), seen.join(', '))
      } finally {
        await proxy.close()
      }
    })

    test('getInfo', async () => {
      const info = await sbx.getInfo()
      assert.equal(info.sandboxId, sbx.sandboxId)
      assert.ok([info.templateId, info.name].includes('base'), JSON.stringify(info))
      assert.equal(info.metadata['e2e-run'], RUN_ID)
      assert.equal(info.state, 'running')
      assert.ok(info.endAt > info.startedAt)
    })

    test('list with a metadata filter', async () => {
      const value = 'a b/c%d=e ü ✓'
      const marked = await create({ metadata: { group: `${RUN_ID}-${pkg}`, value } })
      const other = await create({ metadata: { group: `${RUN_ID}-${pkg}`, value: 'other' } })
      const ids = async (metadata) => {
        const paginator = Sandbox.list({ query: { metadata } })
        const found = []
        while (paginator.hasNext) found.push(...(await paginator.nextItems()).map((s) => s.sandboxId))
        return found.sort()
      }
      assert.deepEqual(await ids({ group: `${RUN_ID}-${pkg}` }), [marked.sandboxId, other.sandboxId].sort())
      assert.deepEqual(await ids({ group: `${RUN_ID}-${pkg}`, value }), [marked.sandboxId])
      assert.deepEqual(await ids({ group: `${RUN_ID}-${pkg}`, value: 'nope' }), [])
      await marked.kill()
      await other.kill()
    })

    test('commands: stdout, stderr, exit codes', async () => {
      const ok = await sbx.commands.run('echo out; echo err >&2')
      assert.equal(ok.exitCode, 0)
      assert.equal(ok.stdout, 'out\n')
      assert.equal(ok.stderr, 'err\n')
      await assert.rejects(sbx.commands.run("echo partial; echo 'it broke' >&2; exit 5"), (err) => {
        assert.ok(err instanceof CommandExitError, String(err))
        assert.equal(err.exitCode, 5)
        assert.equal(err.stderr, 'it broke\n')
        assert.equal(err.stdout, 'partial\n')
        return true
      })
    })

    test('commands: env vars, cwd, users', async () => {
      assert.equal((await sbx.commands.run('echo "$FOO"', { envs: { FOO: 'bar baz' } })).stdout, 'bar baz\n')
      assert.equal((await sbx.commands.run('echo "${FOO-unset}"')).stdout, 'unset\n')
      assert.equal((await sbx.commands.run('echo "$SBX_CREATE_VAR"')).stdout, 'from create\n')
      assert.equal((await sbx.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
      assert.equal((await sbx.commands.run('whoami; echo "$HOME"')).stdout, 'user\n/home/user\n')
      assert.equal((await sbx.commands.run('whoami; echo "$HOME"', { user: 'root' })).stdout, 'root\n/root\n')
      const ids = await sbx.commands.run('echo "$E2B_SANDBOX|$E2B_SANDBOX_ID"')
      assert.equal(ids.stdout, `true|${sbx.sandboxId}\n`)
    })

    test('commands: background process list and kill', async () => {
      const handle = await sbx.commands.run('sleep 600', { background: true })
      assert.ok((await sbx.commands.list()).some((p) => p.pid === handle.pid))
      assert.equal(await sbx.commands.kill(handle.pid), true)
      await handle.wait().catch(() => {})
      assert.equal(await sbx.commands.kill(handle.pid), false)
    })

    test('files: write/read/list/exists/makeDir/rename/remove', async () => {
      const d = `/home/user/js-${pkg}`
      const text = 'héllo from js\n'
      const w = await sbx.files.write(`${d}/a/hello.txt`, text)
      assert.equal(w.path, `${d}/a/hello.txt`)
      assert.equal(await sbx.files.read(`${d}/a/hello.txt`), text)
      assert.equal((await sbx.commands.run(`cat ${d}/a/hello.txt`)).stdout, text)

      const blob = randomBytes(1 << 20)
      await sbx.files.write(`${d}/blob.bin`, blob.buffer.slice(blob.byteOffset, blob.byteOffset + blob.length))
      const back = Buffer.from(await sbx.files.read(`${d}/blob.bin`, { format: 'bytes' }))
      assert.equal(createHash('sha256').update(back).digest('hex'), createHash('sha256').update(blob).digest('hex'))

      const names = (await sbx.files.list(d)).map((e) => `${e.name}:${e.type}`).sort()
      assert.deepEqual(names, ['a:dir', 'blob.bin:file'])
      assert.equal(await sbx.files.exists(`${d}/a/hello.txt`), true)
      assert.equal(await sbx.files.exists(`${d}/nope`), false)
      assert.equal(await sbx.files.makeDir(`${d}/made`), true)
      assert.equal(await sbx.files.makeDir(`${d}/made`), false)
      const moved = await sbx.files.rename(`${d}/a/hello.txt`, `${d}/made/moved.txt`)
      assert.equal(moved.path, `${d}/made/moved.txt`)
      assert.equal(await sbx.files.exists(`${d}/a/hello.txt`), false)
      assert.equal(await sbx.files.read(`${d}/made/moved.txt`), text)
      await sbx.files.remove(`${d}/made`)
      assert.equal(await sbx.files.exists(`${d}/made`), false)
      await assert.rejects(sbx.files.read(`${d}/missing.txt`), FileNotFoundError)
    })

    test('bad input: unknown sandbox, wrong API key', async () => {
      await assert.rejects(Sandbox.getInfo(UNKNOWN_ID), NotFoundError)
      assert.equal(await Sandbox.kill(UNKNOWN_ID), false)
      await assert.rejects(Sandbox.create('base', { apiKey: `e2b_${'0'.repeat(40)}` }), AuthenticationError)
      await assert.rejects(Sandbox.create('no-such-template-e2e', { metadata: { 'e2e-run': RUN_ID } }), (err) => {
        assert.match(String(err), /404/)
        return true
      })
    })

    test('kill', async () => {
      const s = await create()
      assert.equal(await s.isRunning(), true)
      await s.kill()
      assert.equal(await s.isRunning(), false)
      assert.equal(await Sandbox.kill(s.sandboxId), false)
      await assert.rejects(Sandbox.getInfo(s.sandboxId), NotFoundError)
    })
  })
}
