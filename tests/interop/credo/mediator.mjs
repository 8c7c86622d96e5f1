// Credo 0.6.3's own mediator, with mailroom's outer interface, so the interop scenarios can
// be validated against a known-good mediator and then pointed at mailroom unchanged:
//   public listener: POST / (envelopes), GET / Upgrade: websocket, GET /invitation ->
//                    {"invitation_url", "invitation"} (multi-use OOB 1.1, http + ws services)
//   admin listener:  GET /health, GET /ready
//
//   node mediator.mjs --port P --admin-port A --data DIR [--strategy QueueAndLiveModeDelivery]
import { DidCommHttpInboundTransport, DidCommWsInboundTransport } from '@credo-ts/node'
import { DidCommMessageForwardingStrategy } from '@credo-ts/didcomm'
import http from 'node:http'
import { parseArgs } from 'node:util'
import { WebSocketServer } from 'ws'
import { errorText, listenLoopback, makeAgent, sendJson } from './common.mjs'

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string' },
    'admin-port': { type: 'string' },
    data: { type: 'string' },
    strategy: { type: 'string', default: 'QueueAndLiveModeDelivery' },
    'public-url': { type: 'string' },
  },
})
if (!opts.port || !opts['admin-port'] || !opts.data || !Object.values(DidCommMessageForwardingStrategy).includes(opts.strategy)) {
  console.error('usage: mediator.mjs --port P --admin-port A --data DIR [--strategy QueueOnly|QueueAndLiveModeDelivery|DirectDelivery]')
  process.exit(64)
}

const port = Number(opts.port)
const publicUrl = (opts['public-url'] ?? `http://127.0.0.1:${port}`).replace(/\/$/, '')
const endpoints = [publicUrl, publicUrl.replace(/^http/, 'ws')]

let ready = false
let invitation

// One server for HTTP and WebSocket, bound on 127.0.0.1 before the agent starts.
const httpInbound = new DidCommHttpInboundTransport({ port })
const server = http.createServer(httpInbound.app)
httpInbound.app.listen = () => server
const socketServer = new WebSocketServer({ noServer: true, maxPayload: 16 << 20 })
server.on('upgrade', (request, socket, head) => {
  socketServer.handleUpgrade(request, socket, head, (ws) => socketServer.emit('connection', ws, request))
})
httpInbound.app.get('/invitation', (_req, res) => {
  if (!invitation) return res.status(503).json({ error: 'not ready' })
  res.json(invitation)
})

const agent = makeAgent({
  label: 'credo-mediator',
  dataDir: opts.data,
  endpoints,
  inbound: [httpInbound, new DidCommWsInboundTransport({ server: socketServer })],
  mediator: { autoAcceptMediationRequests: true, messageForwardingStrategy: opts.strategy },
})

const admin = http.createServer((req, res) => {
  const path = new URL(req.url, 'http://127.0.0.1').pathname
  if (req.method === 'GET' && path === '/health') return sendJson(res, 200, { ok: true })
  if (req.method === 'GET' && path === '/ready') return sendJson(res, ready ? 200 : 503, { ready })
  if (req.method === 'GET' && path === '/status') return sendJson(res, 200, { node: 'credo', mediator: 'credo-0.6.3', strategy: opts.strategy, ready })
  sendJson(res, 404, { error: 'not found' })
})

async function stop() {
  const hard = setTimeout(() => process.exit(0), 10000)
  hard.unref()
  try {
    await agent.shutdown()
  } catch (e) {
    console.error(`shutdown: ${errorText(e)}`)
  }
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)

try {
  await listenLoopback(server, port)
  await listenLoopback(admin, Number(opts['admin-port']))
  await agent.initialize()
  const rec = await agent.didcomm.oob.createInvitation({ label: 'credo-mediator', multiUseInvitation: true })
  invitation = {
    invitation_url: rec.outOfBandInvitation.toUrl({ domain: `${publicUrl}/invitation` }),
    invitation: rec.outOfBandInvitation.toJSON(),
  }
  ready = true
  console.log(`READY credo mediator ${publicUrl} strategy=${opts.strategy}`)
} catch (e) {
  console.error(`FATAL starting mediator: ${errorText(e)}`)
  process.exit(1)
}
