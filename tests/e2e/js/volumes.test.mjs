// Volumes (issue 14) through the official JS SDK, latest and 2.50.0: Volume CRUD, the volume
// content API (E2B_VOLUME_API_URL, defaulted to E2B_API_URL: SoulBox serves it on the control
// plane) and volumeMounts at create, one volume shared by two sandboxes.
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import { after, describe, test } from 'node:test'

const require = createRequire(import.meta.url)

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) {
    throw new Error(`${name} is not set: point the suite at a running soulbox serve or run scripts/test`)
  }
}
process.env.E2B_VOLUME_API_URL ??= process.env.E2B_API_URL

const RUN_ID = `js${Date.now()}`

for (const pkg of ['e2b', 'e2b-2-50']) {
  const { Sandbox, Volume } = await import(pkg)
  const version = require(`${pkg}/package.json`).version

  describe(`volumes with e2b@${version} (${pkg})`, () => {
    const sandboxes = new Set()
    const volumes = new Set()
    const makeVolume = async () => {
      const v = await Volume.create(`js-${RUN_ID}-${Math.random().toString(36).slice(2, 8)}`)
      volumes.add(v.volumeId)
      return v
    }
    const create = async (opts = {}) => {
      const sbx = await Sandbox.create('base', {
        timeoutMs: 300_000,
        ...opts,
        metadata: { 'e2e-run': RUN_ID, sdk: `js-${version}` },
      })
      sandboxes.add(sbx.sandboxId)
      return sbx
    }

    after(async () => {
      for (const id of sandboxes) await Sandbox.kill(id).catch(() => {})
      for (const id of volumes) await Volume.destroy(id).catch(() => {})
    })

    test('create, list, get, connect and destroy', async () => {
      const vol = await makeVolume()
      assert.ok(vol.token)
      const listed = await Volume.list()
      assert.ok(listed.some((v) => v.volumeId === vol.volumeId && v.name === vol.name))
      const info = await Volume.getInfo(vol.volumeId)
      assert.equal(info.name, vol.name)
      const again = await Volume.connect(vol.volumeId)
      assert.equal(again.token, vol.token)
      assert.equal(await Volume.destroy(vol.volumeId), true)
      assert.equal(await Volume.destroy(vol.volumeId), false)
      await assert.rejects(Volume.create('a/b'))
    })

    test('content API', async () => {
      const vol = await makeVolume()
      const st = await vol.writeFile('/dir/hello.txt', 'hello from js', { force: true })
      assert.equal(st.path, '/dir/hello.txt')
      assert.equal(st.size, 13)
      assert.equal(await vol.readFile('/dir/hello.txt'), 'hello from js')
      const entries = await vol.list('/', { depth: 2 })
      assert.deepEqual(entries.map((e) => e.path).sort(), ['/dir', '/dir/hello.txt'])
      await vol.makeDir('/a/b', { force: true })
      assert.equal(await vol.exists('/a/b'), true)
      assert.equal(await vol.exists('/nope'), false)
      const updated = await vol.updateMetadata('/dir/hello.txt', { mode: 0o600 })
      assert.equal(updated.mode, 0o600)
      await vol.remove('/a')
      assert.equal(await vol.exists('/a'), false)
      await assert.rejects(vol.readFile('/missing'))
      await assert.rejects(vol.readFile('../etc/passwd'))
    })

    test('one volume in two sandboxes at once', async () => {
      const vol = await makeVolume()
      await vol.writeFile('/shared.txt', 'from the API')
      const a = await create({ volumeMounts: { '/data': vol } })
      const b = await create({ volumeMounts: { '/mnt/v': vol.name } })
      assert.equal((await a.commands.run('cat /data/shared.txt')).stdout, 'from the API')
      await a.commands.run('echo from-a > /data/a.txt')
      assert.equal((await b.commands.run('cat /mnt/v/a.txt')).stdout, 'from-a\n')
      assert.equal((await b.commands.run("stat -c '%U:%G' /mnt/v/a.txt")).stdout.trim(), 'user:user')
      await b.commands.run('echo from-b > /mnt/v/b.txt')
      assert.equal(await vol.readFile('/b.txt'), 'from-b\n')
      const other = await create()
      const r = await other.commands.run('test -e /data || test -e /mnt/v || echo absent')
      assert.equal(r.stdout, 'absent\n')
      await assert.rejects(create({ volumeMounts: { '/data': `no-such-volume-${RUN_ID}` } }))
    })
  })
}
