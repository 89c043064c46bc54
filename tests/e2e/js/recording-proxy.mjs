// A forwarding HTTP proxy in front of the control plane that records [method, path] of every
// request, to prove which REST routes an SDK version really calls. Requests and answers pass
// through unchanged.
import http from 'node:http'

const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade', 'host'])

export async function startRecordingProxy(target) {
  const upstream = new URL(target)
  if (upstream.protocol !== 'http:') throw new Error(`only http:// targets are supported, got ${target}`)
  const seen = []
  const server = http.createServer((req, res) => {
    seen.push([req.method, new URL(req.url, 'http://proxy').pathname])
    const headers = Object.fromEntries(Object.entries(req.headers).filter(([k]) => !HOP_BY_HOP.has(k)))
    const forward = http.request(
      { host: upstream.hostname, port: upstream.port || 80, method: req.method, path: req.url, headers },
      (answer) => {
        const out = Object.fromEntries(Object.entries(answer.headers).filter(([k]) => !HOP_BY_HOP.has(k)))
        res.writeHead(answer.statusCode ?? 502, out)
        answer.pipe(res)
      },
    )
    forward.on('error', (err) => {
      res.writeHead(599, { 'content-type': 'text/plain' })
      res.end(`recording proxy: ${err.message}`)
    })
    req.pipe(forward)
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    seen: () => [...seen],
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}
