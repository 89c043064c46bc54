// Behaviour of `soulbox interpreter` through the official JS SDK (@e2b/code-interpreter).
// Run: E2B_DEBUG=true NODE_PATH=<dir with @e2b/code-interpreter> node --test js_sdk.test.cjs
const test = require('node:test')
const assert = require('node:assert/strict')
const { Sandbox } = require('@e2b/code-interpreter')

process.env.E2B_DEBUG ??= 'true'
process.env.E2B_API_KEY ??= 'e2b_' + '0'.repeat(40)

test('1+1, state and execution count', async () => {
  const sbx = await Sandbox.create()
  const first = await sbx.runCode('js_state = 1; 1+1')
  assert.equal(first.text, '2')
  const second = await sbx.runCode('js_state += 1; js_state')
  assert.equal(second.text, '2')
  assert.equal(second.executionCount, first.executionCount + 1)
})

test('streaming callbacks and errors', async () => {
  const sbx = await Sandbox.create()
  const out = []
  const err = []
  const results = []
  const errors = []
  const execution = await sbx.runCode(
    'import sys\nprint("out")\nprint("err", file=sys.stderr)\n5',
    {
      onStdout: (m) => out.push(m.line),
      onStderr: (m) => err.push(m.line),
      onResult: (r) => results.push(r.text),
    },
  )
  assert.deepEqual(out, ['out\n'])
  assert.deepEqual(err, ['err\n'])
  assert.deepEqual(results, ['5'])
  assert.deepEqual(execution.logs.stdout, ['out\n'])
  const failed = await sbx.runCode('missing_name', { onError: (e) => errors.push(e) })
  assert.equal(failed.error.name, 'NameError')
  assert.equal(errors.length, 1)
  assert.equal((await sbx.runCode('3*3')).text, '9')
})

test('charts and dataframes', async () => {
  const sbx = await Sandbox.create()
  const line = await sbx.runCode(
    'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9], label="sq")\nplt.title("Squares")\nplt.show()',
  )
  const result = line.results[0]
  assert.ok(result.png)
  assert.equal(result.chart.type, 'line')
  assert.equal(result.chart.title, 'Squares')
  assert.deepEqual(result.chart.elements[0].points, [[1, 1], [2, 4], [3, 9]])
  const bar = await sbx.runCode('import matplotlib.pyplot as plt\nplt.bar(["a", "b"], [1, 2])\nplt.show()')
  assert.equal(bar.results[0].chart.type, 'bar')
  assert.deepEqual(bar.results[0].chart.elements.map((e) => [e.label, e.value]), [['a', 1], ['b', 2]])
  const frame = await sbx.runCode('import pandas as pd\npd.DataFrame({"a": [1, 2, 3]})')
  assert.deepEqual(frame.results[0].data, { a: [1, 2, 3] })
  assert.match(frame.results[0].html, /<table/)
})

test('contexts', async () => {
  const sbx = await Sandbox.create()
  const ctx = await sbx.createCodeContext({ language: 'python' })
  await sbx.runCode('only_here = 1', { context: ctx })
  assert.equal((await sbx.runCode('only_here', { context: ctx })).text, '1')
  assert.equal((await sbx.runCode('only_here')).error.name, 'NameError')
  const listed = await sbx.listCodeContexts()
  assert.equal(listed.at(-1).id, ctx.id)
  await sbx.restartCodeContext(ctx)
  assert.equal((await sbx.runCode('only_here', { context: ctx })).error.name, 'NameError')
  await sbx.removeCodeContext(ctx)
  await assert.rejects(sbx.runCode('1', { context: ctx }), /not found/)
})

test('javascript and bash kernels, env vars', async () => {
  const sbx = await Sandbox.create()
  const js = await sbx.runCode('console.log("hi from node"); 20 + 1', { language: 'js' })
  assert.deepEqual(js.logs.stdout, ['hi from node\n'])
  assert.equal(js.text, '21')
  const env = await sbx.runCode('process.env.JS_VAR', { language: 'javascript', envs: { JS_VAR: 'set' } })
  assert.equal(env.text, 'set')
  assert.equal((await sbx.runCode('process.env.JS_VAR || "gone"', { language: 'javascript' })).text, 'gone')
  const py = await sbx.runCode('import os; os.getenv("PY_VAR")', { envs: { PY_VAR: 'x' } })
  assert.equal(py.text, 'x')
  const bash = await sbx.runCode('echo $B_VAR', { language: 'bash', envs: { B_VAR: 'b' } })
  assert.deepEqual(bash.logs.stdout, ['b\n'])
})

test('timeout interrupts the kernel', async () => {
  const sbx = await Sandbox.create()
  const ctx = await sbx.createCodeContext()
  await sbx.runCode('kept = "yes"', { context: ctx })
  await assert.rejects(sbx.runCode('import time; time.sleep(30)', { context: ctx, timeoutMs: 2000 }))
  const after = await sbx.runCode('kept', { context: ctx, timeoutMs: 15000 })
  assert.equal(after.text, 'yes')
})
