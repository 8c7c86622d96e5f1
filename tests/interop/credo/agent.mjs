// A real Credo 0.6.3 agent, steered over a small JSON control API on 127.0.0.1 (the way
// ACA-Py is steered over its admin API), so one orchestrator drives Credo and ACA-Py alike.
//
//   node agent.mjs --role sender   --label S --data DIR
//   node agent.mjs --role mediatee --label M --data DIR --mediator-invitation URL --pickup PickUpV2LiveMode
//
// A sender has its own HTTP inbound endpoint (http://127.0.0.1:<os port>). A mediatee has no
// endpoint: it connects to the mediator from the invitation, asks for mediation, and gets
// its messages with the given pickup strategy. When ready the process prints one line
//   READY {"control":"http://127.0.0.1:P", ...}
// on stdout. Control API (JSON in, JSON out):
//   GET  /status
//   POST /oob/create        {}                         -> {invitationUrl, outOfBandId}
//   POST /oob/receive       {invitationUrl, timeoutMs} -> {connectionId}   (waits until completed)
//   POST /connection/wait   {outOfBandId, timeoutMs}   -> {connectionId}   (waits until completed)
//   POST /send              {connectionId, count, prefix, concurrency}  -> {sent, failed, errors, ms}
//   GET  /received?prefix=P                            -> {total, unique, duplicates, ...}
//   POST /received/wait     {prefix, count, timeoutMs} -> same, once `count` unique arrived or on timeout
//   POST /agent/stop                                   (agent.shutdown(): goes offline, wallet kept)
//   POST /agent/start                                  (same wallet, back online)
//   POST /exit
import { DidCommBasicMessageEventTypes, DidCommBasicMessageRole, DidCommDidExchangeState, DidCommMediatorPickupStrategy } from '@credo-ts/didcomm'
import http from 'node:http'
import { parseArgs } from 'node:util'
import { errorText, listenLoopback, loopbackHttpInbound, makeAgent, readJson, sendJson, waitFor } from './common.mjs'

const { values: opts } = parseArgs({
  options: {
    role: { type: 'string' },
    label: { type: 'string' },
    data: { type: 'string' },
    'mediator-invitation': { type: 'string' },
    pickup: { type: 'string', default: 'PickUpV2LiveMode' },
    'polling-ms': { type: 'string', default: '1000' },
  },
})
if (!['sender', 'mediatee'].includes(opts.role) || !opts.label || !opts.data) {
  console.error('usage: agent.mjs --role sender|mediatee --label L --data DIR [--mediator-invitation URL --pickup S]')
  process.exit(64)
}
if (opts.role === 'mediatee') {
  if (!opts['mediator-invitation']) {
    console.error('a mediatee needs --mediator-invitation')
    process.exit(64)
  }
  if (!Object.values(DidCommMediatorPickupStrategy).includes(opts.pickup)) {
    console.error(`unknown pickup strategy ${opts.pickup}; one of ${Object.values(DidCommMediatorPickupStrategy).join(', ')}`)
    process.exit(64)
  }
}

// Received basic messages, kept across agent restarts: content -> times seen.
const received = new Map()
let receivedTotal = 0
let agent
let inboundPort
let stopping = false

async function startAgent() {
  let inbound = []
  let endpoints
  if (opts.role === 'sender') {
    // The same port across restarts keeps the DID documents' endpoint valid.
    const h = await loopbackHttpInbound(inboundPort ?? 0)
    inboundPort = h.port
    inbound = [h.transport]
    endpoints = [`http://127.0.0.1:${h.port}`]
  }
  const a = makeAgent({
    label: opts.label,
    dataDir: opts.data,
    endpoints,
    inbound,
    mediationRecipient:
      opts.role === 'mediatee'
        ? {
            mediatorInvitationUrl: opts['mediator-invitation'],
            mediatorPickupStrategy: opts.pickup,
            mediatorPollingInterval: Number(opts['polling-ms']),
          }
        : undefined,
  })
  a.events.on(DidCommBasicMessageEventTypes.DidCommBasicMessageStateChanged, (e) => {
    const rec = e.payload.basicMessageRecord
    if (rec.role !== DidCommBasicMessageRole.Receiver) return
    receivedTotal++
    received.set(rec.content, (received.get(rec.content) ?? 0) + 1)
  })
  await a.initialize()
  agent = a
}

function receivedSummary(prefix = '') {
  let total = 0
  let unique = 0
  let duplicates = 0
  for (const [content, n] of received) {
    if (!content.startsWith(prefix)) continue
    total += n
    unique++
    duplicates += n - 1
  }
  return { prefix, total, unique, duplicates, allReceived: receivedTotal }
}

async function waitConnected(outOfBandId, timeoutMs) {
  const rec = await waitFor(
    async () => {
      const conns = await agent.didcomm.connections.findAllByOutOfBandId(outOfBandId)
      return conns.find((c) => c.state === DidCommDidExchangeState.Completed)
    },
    { timeoutMs, what: `a completed connection for out-of-band record ${outOfBandId}` },
  )
  return rec.id
}

function requireAgent() {
  if (!agent) throw Object.assign(new Error('agent is stopped'), { status: 409 })
}

const routes = {
  'GET /status': async () => {
    const out = { role: opts.role, label: opts.label, online: !!agent, received: receivedSummary() }
    if (agent && opts.role === 'mediatee') {
      const m = await agent.didcomm.mediationRecipient.findDefaultMediator()
      out.mediator = m ? { state: m.state, connectionId: m.connectionId, pickupStrategy: m.pickupStrategy } : null
    }
    if (agent) {
      const conns = await agent.didcomm.connections.getAll()
      out.connections = conns.map((c) => ({ id: c.id, state: c.state, theirLabel: c.theirLabel, protocol: c.protocol }))
    }
    return out
  },
  'POST /oob/create': async () => {
    requireAgent()
    const rec = await agent.didcomm.oob.createInvitation({ label: opts.label, autoAcceptConnection: true })
    return {
      outOfBandId: rec.id,
      invitationUrl: rec.outOfBandInvitation.toUrl({ domain: 'https://example.org/ssi' }),
      invitation: rec.outOfBandInvitation.toJSON(),
    }
  },
  'POST /oob/receive': async (body) => {
    requireAgent()
    const { outOfBandRecord, connectionRecord } = await agent.didcomm.oob.receiveInvitationFromUrl(body.invitationUrl, {
      label: opts.label,
      autoAcceptInvitation: true,
      autoAcceptConnection: true,
      reuseConnection: false,
    })
    if (!connectionRecord) throw new Error('receiving the invitation made no connection')
    const connectionId = await waitConnected(outOfBandRecord.id, body.timeoutMs ?? 30000)
    return { connectionId, outOfBandId: outOfBandRecord.id }
  },
  'POST /connection/wait': async (body) => {
    requireAgent()
    return { connectionId: await waitConnected(body.outOfBandId, body.timeoutMs ?? 30000) }
  },
  'POST /send': async (body) => {
    requireAgent()
    const { connectionId, count = 1, prefix = 'msg', concurrency = 1 } = body
    const started = Date.now()
    let next = 0
    let sent = 0
    const errors = []
    const worker = async () => {
      for (;;) {
        const i = next++
        if (i >= count) return
        const content = `${prefix}-${String(i).padStart(4, '0')}`
        try {
          await agent.didcomm.basicMessages.sendMessage(connectionId, content)
          sent++
        } catch (e) {
          errors.push(`${content}: ${errorText(e)}`)
        }
      }
    }
    await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, count)) }, worker))
    return { sent, failed: errors.length, errors: errors.slice(0, 5), ms: Date.now() - started }
  },
  'GET /received': async (_body, url) => receivedSummary(url.searchParams.get('prefix') ?? ''),
  'POST /received/wait': async (body) => {
    const { prefix = '', count = 1, timeoutMs = 30000 } = body
    const started = Date.now()
    try {
      await waitFor(() => receivedSummary(prefix).unique >= count, { timeoutMs, everyMs: 50, what: `${count} messages` })
    } catch {
      // fall through: the caller compares the counts
    }
    return { ...receivedSummary(prefix), ms: Date.now() - started }
  },
  'POST /agent/stop': async () => {
    requireAgent()
    const a = agent
    agent = undefined
    await a.shutdown()
    return { online: false }
  },
  'POST /agent/start': async () => {
    if (agent) return { online: true }
    const started = Date.now()
    await startAgent()
    return { online: true, ms: Date.now() - started }
  },
  'POST /exit': async () => {
    setImmediate(shutdownAndExit)
    return { exiting: true }
  },
}

async function shutdownAndExit(code = 0) {
  if (stopping) return
  stopping = true
  const hardStop = setTimeout(() => process.exit(code), 10000)
  hardStop.unref()
  try {
    if (agent) await agent.shutdown()
  } catch (e) {
    console.error(`shutdown: ${errorText(e)}`)
  }
  process.exit(code)
}

const control = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1')
  const route = routes[`${req.method} ${url.pathname}`]
  if (!route) return sendJson(res, 404, { error: `no route ${req.method} ${url.pathname}` })
  try {
    const body = req.method === 'POST' ? await readJson(req) : {}
    sendJson(res, 200, await route(body, url))
  } catch (e) {
    sendJson(res, e.status ?? 500, { error: errorText(e) })
  }
})
control.requestTimeout = 0
control.headersTimeout = 0

process.on('SIGTERM', () => shutdownAndExit(0))
process.on('SIGINT', () => shutdownAndExit(0))
process.on('unhandledRejection', (e) => console.error(`unhandled rejection: ${errorText(e)}`))
// An exit of Node's own (process.exit, an empty event loop) says so; a death by a signal cannot.
process.on('exit', (code) => console.error(`exit: code ${code}`))

try {
  const t0 = Date.now()
  await startAgent()
  const port = await listenLoopback(control)
  console.log(`READY ${JSON.stringify({ control: `http://127.0.0.1:${port}`, role: opts.role, inboundPort, initMs: Date.now() - t0 })}`)
} catch (e) {
  console.error(`FATAL starting ${opts.role}: ${errorText(e)}`)
  if (e?.stack) console.error(e.stack)
  process.exit(1)
}
