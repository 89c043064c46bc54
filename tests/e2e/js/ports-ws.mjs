// A minimal WebSocket client on node:http/node:https (Node 20 has no WebSocket global): opens
// /ws through the gateway and exchanges frames with the test app of ../python/suite/ports_fixtures.
import { randomBytes } from 'node:crypto'
import http from 'node:http'
import https from 'node:https'

/** Opens a WebSocket; resolves { status, send(bytes), recv() → { opcode, payload }, close() }. */
export function openWebSocket({ url, headers = {} }) {
  const u = new URL(url)
  const lib = u.protocol === 'https:' ? https : http
  return new Promise((resolve, reject) => {
    const req = lib.request({
      hostname: u.hostname,
      port: u.port || (u.protocol === 'https:' ? 443 : 80),
      path: u.pathname,
      headers: {
        ...headers,
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Key': randomBytes(16).toString('base64'),
        'Sec-WebSocket-Version': '13',
      },
    })
    req.on('error', reject)
    req.on('response', (res) => {
      res.resume()
      resolve({ status: res.statusCode })
    })
    req.on('upgrade', (res, socket, head) => {
      let buf = head
      const waiting = []
      const pump = () => {
        while (waiting.length) {
          if (buf.length < 2) return
          let n = buf[1] & 0x7f
          let off = 2
          if (n === 126) { if (buf.length < 4) return; n = buf.readUInt16BE(2); off = 4 }
          else if (n === 127) { if (buf.length < 10) return; n = Number(buf.readBigUInt64BE(2)); off = 10 }
          if (buf.length < off + n) return
          const frame = { opcode: buf[0] & 0x0f, payload: buf.subarray(off, off + n) }
          buf = buf.subarray(off + n)
          waiting.shift()(frame)
        }
      }
      socket.on('data', (d) => { buf = Buffer.concat([buf, d]); pump() })
      resolve({
        status: res.statusCode,
        send(payload, opcode = 2) {
          const mask = randomBytes(4)
          const n = payload.length
          const head = n < 126 ? Buffer.from([0x80 | opcode, 0x80 | n])
            : n < 65536 ? Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | 126]), Buffer.from([n >> 8, n & 0xff])])
            : (() => { const b = Buffer.alloc(10); b[0] = 0x80 | opcode; b[1] = 0x80 | 127; b.writeBigUInt64BE(BigInt(n), 2); return b })()
          const body = Buffer.from(payload).map((b, i) => b ^ mask[i % 4])
          socket.write(Buffer.concat([head, mask, body]))
        },
        recv() {
          return new Promise((res) => { waiting.push(res); pump() })
        },
        close() { socket.destroy() },
      })
    })
    req.end()
  })
}
