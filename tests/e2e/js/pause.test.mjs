// Pause and resume from the official JS SDK (latest and 2.50.0): full and filesystem pauses,
// resume through connect, auto-pause on timeout (lifecycle), and the "already paused" answer.
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import { after, describe, test } from 'node:test'

const require = createRequire(import.meta.url)
const RUN_ID = `js-pause-${Date.now()}`

for (const pkg of ['e2b', 'e2b-2-50']) {
  const { Sandbox } = await import(pkg)
  const version = require(`${pkg}/package.json`).version

  describe(`pause and resume, e2b@${version} (${pkg})`, () => {
    const created = new Set()
    const create = async (opts = {}) => {
      const sbx = await Sandbox.create('base', {
        timeoutMs: 120_000,
        ...opts,
        metadata: { 'e2e-run': RUN_ID },
      })
      created.add(sbx.sandboxId)
      return sbx
    }
    const stateOf = async (id) => (await Sandbox.getInfo(id)).state

    after(async () => {
      for (const id of created) await Sandbox.kill(id).catch(() => {})
    })

    test('a full pause keeps files and processes; connect resumes it', async () => {
      const sbx = await create()
      await sbx.files.write('/home/user/js.txt', 'kept')
      const bg = await sbx.commands.run('sleep 900', { background: true })
      assert.equal(await sbx.pause(), true)
      assert.equal(await stateOf(sbx.sandboxId), 'paused')
      assert.equal(await sbx.pause(), false, 'a second pause answers false')
      const resumed = await Sandbox.connect(sbx.sandboxId)
      assert.equal(await stateOf(sbx.sandboxId), 'running')
      assert.equal(await resumed.files.read('/home/user/js.txt'), 'kept')
      const pids = (await resumed.commands.list()).map((p) => p.pid)
      assert.ok(pids.includes(bg.pid), `pid ${bg.pid} not in ${pids}`)
    })

    test('a filesystem pause keeps files and boots again', async () => {
      const sbx = await create()
      await sbx.files.write('/home/user/fs.txt', 'disk')
      await sbx.commands.run('sleep 900', { background: true })
      assert.equal(await sbx.pause({ keepMemory: false }), true)
      const resumed = await Sandbox.connect(sbx.sandboxId)
      assert.equal(await resumed.files.read('/home/user/fs.txt'), 'disk')
      const cmds = (await resumed.commands.list()).map((p) => [p.cmd, ...p.args].join(' '))
      assert.ok(!cmds.some((c) => c.includes('sleep 900')), `processes survived a reboot: ${cmds}`)
    })

    test('lifecycle onTimeout pause pauses instead of killing', { skip: pkg !== 'e2b' }, async () => {
      const sbx = await create({ timeoutMs: 4_000, lifecycle: { onTimeout: 'pause' } })
      await sbx.files.write('/home/user/t.txt', 'timeout')
      const deadline = Date.now() + 30_000
      while ((await stateOf(sbx.sandboxId)) !== 'paused') {
        assert.ok(Date.now() < deadline, 'never auto-paused')
        await new Promise((r) => setTimeout(r, 250))
      }
      const resumed = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 60_000 })
      assert.equal(await resumed.files.read('/home/user/t.txt'), 'timeout')
    })
  })
}
