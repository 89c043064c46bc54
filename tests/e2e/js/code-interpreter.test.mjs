// The unmodified @e2b/code-interpreter SDK against `soulbox serve` and the shipped
// code-interpreter-v1 template (issue 6), in URL mode (E2B_API_URL/E2B_SANDBOX_URL). Needs the
// template built (`soulbox template build code-interpreter-v1`; scripts/test does it).
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import { after, before, describe, test } from 'node:test'

import { Sandbox } from '@e2b/code-interpreter'

const require = createRequire(import.meta.url)
const version = require('@e2b/code-interpreter/package.json').version
const RUN_ID = `jsci${Date.now()}`

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) {
    throw new Error(`${name} is not set: point the suite at a running soulbox serve or run scripts/test`)
  }
}

describe(`@e2b/code-interpreter@${version}`, () => {
  let sbx

  before(async () => {
    sbx = await Sandbox.create('code-interpreter-v1', {
      timeoutMs: 300_000,
      envs: { CI_CREATE_VAR: 'from-create' },
      metadata: { 'e2e-run': RUN_ID, sdk: `js-ci-${version}` },
    })
  })

  after(async () => {
    if (sbx) await Sandbox.kill(sbx.sandboxId).catch(() => {})
  })

  test('1+1', async () => {
    const execution = await sbx.runCode('1+1')
    assert.equal(execution.text, '2')
    assert.equal(execution.error, undefined)
    assert.ok(execution.results[0].isMainResult)
  })

  test('state persists between calls', async () => {
    await sbx.runCode('js_counter = 41')
    assert.equal((await sbx.runCode('js_counter += 1\njs_counter')).text, '42')
  })

  test('callbacks stream stdout, stderr and results', async () => {
    const stdout = []
    const stderr = []
    const results = []
    const arrivals = []
    const t0 = Date.now()
    await sbx.runCode(
      "import sys, time\nprint('first')\nsys.stdout.flush()\ntime.sleep(1.5)\nprint('oops', file=sys.stderr)\nprint('second')\n'done'",
      {
        onStdout: (m) => {
          stdout.push(m.line)
          arrivals.push(Date.now() - t0)
        },
        onStderr: (m) => stderr.push(m.line),
        onResult: (r) => results.push(r.text),
      },
    )
    assert.deepEqual(stdout, ['first\n', 'second\n'])
    assert.deepEqual(stderr, ['oops\n'])
    assert.deepEqual(results, ['done'])
    assert.ok(arrivals[1] - arrivals[0] > 1000, `streamed, not buffered: ${arrivals}`)
  })

  test('errors are reported and the kernel goes on', async () => {
    const execution = await sbx.runCode("raise ValueError('bad value')")
    assert.equal(execution.error.name, 'ValueError')
    assert.equal(execution.error.value, 'bad value')
    assert.match(execution.error.traceback, /ValueError/)
    assert.equal((await sbx.runCode('2 * 21')).text, '42')
  })

  test('matplotlib line chart: png and chart points', async () => {
    const execution = await sbx.runCode(
      'import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2, 3], [4, 1, 9], label="s")\nax.set_title("T")\nplt.show()',
    )
    assert.equal(execution.error, undefined)
    const [result] = execution.results
    assert.ok(result.png.startsWith('iVBORw0KGgo'))
    assert.equal(result.chart.type, 'line')
    assert.equal(result.chart.title, 'T')
    assert.deepEqual(
      result.chart.elements[0].points.map(([x, y]) => [Number(x), Number(y)]),
      [[1, 4], [2, 1], [3, 9]],
    )
  })

  test('matplotlib bar chart', async () => {
    const execution = await sbx.runCode(
      'import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar(["a", "b"], [3, 5])\nplt.show()',
    )
    const chart = execution.results[0].chart
    assert.equal(chart.type, 'bar')
    assert.deepEqual(chart.elements.map((b) => [b.label, b.value]), [['a', 3], ['b', 5]])
  })

  test('DataFrame: html and data', async () => {
    const execution = await sbx.runCode("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    const [result] = execution.results
    assert.match(result.html, /<table/)
    assert.deepEqual(result.data, { a: [1, 2] })
  })

  test('contexts keep their own state', async () => {
    const first = await sbx.createCodeContext({ cwd: '/tmp' })
    const second = await sbx.createCodeContext()
    await sbx.runCode("ctx_value = 'one'", { context: first })
    assert.equal((await sbx.runCode('ctx_value', { context: first })).text, 'one')
    assert.equal((await sbx.runCode('ctx_value', { context: second })).error.name, 'NameError')
    assert.equal((await sbx.runCode('import os; os.getcwd()', { context: first })).text, '/tmp')
    const ids = (await sbx.listCodeContexts()).map((c) => c.id)
    assert.ok(ids.includes(first.id) && ids.includes(second.id))
    await sbx.removeCodeContext(second)
    assert.ok(!(await sbx.listCodeContexts()).some((c) => c.id === second.id))
  })

  test('bash kernel', async () => {
    const execution = await sbx.runCode('echo "bash $((6 * 7))"', { language: 'bash' })
    assert.equal(execution.logs.stdout.join('').trim(), 'bash 42')
  })

  test('javascript kernel', async () => {
    const execution = await sbx.runCode('const v = 40; v + 2', { language: 'javascript' })
    assert.equal(execution.text, '42')
  })

  test('env vars: from create and per call', async () => {
    assert.equal((await sbx.runCode("import os; os.environ['CI_CREATE_VAR']")).text, 'from-create')
    const scoped = await sbx.runCode("import os; os.environ.get('CI_RUN_VAR')", { envs: { CI_RUN_VAR: 'per-run' } })
    assert.equal(scoped.text, 'per-run')
    assert.equal((await sbx.runCode("import os; os.environ.get('CI_RUN_VAR', 'unset')")).text, 'unset')
  })

  test('a timeout interrupts the kernel and keeps its state', async () => {
    await sbx.runCode("kept = 'still here'")
    const t0 = Date.now()
    await assert.rejects(sbx.runCode('import time\nwhile True:\n    time.sleep(0.1)', { timeoutMs: 3000 }))
    assert.ok(Date.now() - t0 < 30_000)
    assert.equal((await sbx.runCode('kept')).text, 'still here')
  })
})
