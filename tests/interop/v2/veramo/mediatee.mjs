// A real Veramo 7.0.1 wallet using a DIDComm v2 mediator: coordinate-mediation 3.0 with
// Veramo's own message builders and recipient handler, routing 2.0 (its DID's service points at
// the mediator DID), messagepickup 3.0 polled over HTTP with Veramo's PickupRecipientMessageHandler
// (which opens each delivery, hands the attachments to the agent and answers messages-received).
// Veramo has no WebSocket transport and no live mode.
//
//   node mediatee.mjs --invitation 'http://...?_oob=...' [--interval-ms 500] [--exit-after N] [--timeout-s 120]
//
// Prints JSON lines on stdout:
//   {"event":"granted", "mediator":..., "routing_did":[...], "ms":...}
//   {"event":"ready", "did":"<its did:peer:2, service uri = the mediator DID>", "mediator":..., "ms":...}
//   {"event":"received", "id", "type", "from", "content", "packing", "attachment_id", "ms"}   one per message
//   {"event":"status", "message_count", "live_delivery"}     each pickup status it gets (only when it changes)
//   {"event":"error", "step", "error"}                       then exit 1 (mediation failed) or goes on (pickup)
//   {"event":"done", "received", "unique"}                   on --exit-after N distinct messages, SIGTERM or timeout
// The mediator URL comes from the invitation: `from` is the mediator's DID; Veramo resolves it
// and POSTs to the http(s) uri of its DIDCommMessaging service.
import { parseArgs } from 'node:util'
import {
  CoordinateMediation,
  createV3DeliveryRequestMessage,
  createV3MediateRequestMessage,
  createV3RecipientUpdateMessage,
  createV3StatusRequestMessage,
} from '@veramo/did-comm'
import { createPeer2, errorText, makeVeramoAgent, parseOobUrl } from './agent.mjs'

const { values: opts } = parseArgs({
  options: {
    invitation: { type: 'string' },
    'interval-ms': { type: 'string', default: '500' },
    'exit-after': { type: 'string' },
    'timeout-s': { type: 'string', default: '0' },
  },
})
if (!opts.invitation) {
  console.error("usage: mediatee.mjs --invitation 'http://...?_oob=...' [--interval-ms 500] [--exit-after N] [--timeout-s S]")
  process.exit(64)
}
const t0 = Date.now()
const emit = (o) => process.stdout.write(JSON.stringify({ ...o, ms: Date.now() - t0 }) + '\n')

const PROTOCOL_PREFIXES = ['https://didcomm.org/messagepickup/', 'https://didcomm.org/coordinate-mediation/', 'https://didcomm.org/trust-ping/', 'https://didcomm.org/routing/']
const seen = new Map() // message id -> times
let lastStatus = null

// Every message the agent unpacks passes here; the ones from the mediator's deliveries carry
// the didCommMsgFromMediator metadata (the attachment id).
const listener = {
  eventTypes: ['DIDCommV2Message-received'],
  onEvent: async ({ data }) => {
    const m = data.message
    if (PROTOCOL_PREFIXES.some((p) => m.type?.startsWith(p))) {
      if (m.type === 'https://didcomm.org/messagepickup/3.0/status') {
        const s = JSON.stringify(m.body)
        if (s !== lastStatus) emit({ event: 'status', message_count: m.body?.message_count, live_delivery: m.body?.live_delivery ?? null })
        lastStatus = s
      } else if (m.type?.endsWith('/problem-report')) {
        emit({ event: 'problem-report', body: m.body })
      }
      return
    }
    seen.set(m.id, (seen.get(m.id) ?? 0) + 1)
    emit({ event: 'received', id: m.id, type: m.type, from: m.from ?? null, content: m.body?.content ?? null, packing: data.metaData?.packing })
  },
}
const agent = makeVeramoAgent({ extraPlugins: [listener] })

let stopping = false
function finish(code = 0) {
  if (stopping) return
  stopping = true
  const total = [...seen.values()].reduce((a, b) => a + b, 0)
  emit({ event: 'done', received: total, unique: seen.size })
  process.exit(code)
}
process.on('SIGTERM', () => finish(0))
process.on('SIGINT', () => finish(0))
if (Number(opts['timeout-s']) > 0) setTimeout(() => finish(0), Number(opts['timeout-s']) * 1000).unref()

/** Packs authcrypt and sends with Veramo; returns the message Veramo made of the HTTP response body. */
async function send(message, step) {
  const packedMessage = await agent.packDIDCommMessage({ message, packing: 'authcrypt' })
  const r = await agent.sendDIDCommMessage({ packedMessage, recipientDidUrl: mediatorDid, messageId: message.id })
  return r?.returnMessage
}

let mediatorDid
let myDid
try {
  const inv = parseOobUrl(opts.invitation)
  if (inv.type !== 'https://didcomm.org/out-of-band/2.0/invitation') throw new Error(`not an out-of-band 2.0 invitation: ${inv.type}`)
  mediatorDid = inv.from
  // The wallet's DID routes through the mediator from the start: service uri = mediator DID.
  const me = await createPeer2(agent, { alias: 'mediatee', service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: mediatorDid, accept: ['didcomm/v2'] } } })
  myDid = me.did

  // mediate-request (Veramo's builder sets no return_route; the grant must come back on the
  // POST's response). Stored first so Veramo's grant handler finds the request it answers.
  const req = createV3MediateRequestMessage(myDid, mediatorDid)
  await agent.dataStoreSaveMessage({ message: { id: req.id, type: req.type, from: myDid, to: mediatorDid, createdAt: req.created_time, data: req.body } })
  const grant = await send(req, 'mediate-request')
  if (!grant) throw Object.assign(new Error('no answer in the HTTP response to mediate-request'), { step: 'mediate-request' })
  if (grant.type !== CoordinateMediation.MEDIATE_GRANT) throw Object.assign(new Error(`expected mediate-grant, got ${grant.type} ${JSON.stringify(grant.data)}`), { step: 'mediate-request' })
  const routingDids = grant.data?.routing_did
  emit({ event: 'granted', mediator: mediatorDid, routing_did: routingDids })

  // If the mediator routes through another DID than the one in its invitation, publish a DID
  // that points there (Veramo's grant handler tries to add that service itself, which its
  // did:peer provider refuses: "addService not supported").
  let recipientDid = myDid
  const routing = Array.isArray(routingDids) ? routingDids[0] : routingDids
  if (routing && routing !== mediatorDid) {
    const routed = await createPeer2(agent, { alias: 'routed', service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: routing, accept: ['didcomm/v2'] } } })
    recipientDid = routed.did
  }
  const upd = createV3RecipientUpdateMessage(myDid, mediatorDid, [{ recipient_did: recipientDid, action: 'add' }])
  const updResp = await send(upd, 'recipient-update')
  const results = updResp?.data?.updates ?? []
  if (updResp?.type !== CoordinateMediation.RECIPIENT_UPDATE_RESPONSE || !results.some((u) => u.recipient_did === recipientDid && u.result === 'success')) {
    throw Object.assign(new Error(`recipient-update not confirmed: ${updResp?.type} ${JSON.stringify(updResp?.data)}`), { step: 'recipient-update' })
  }
  emit({ event: 'ready', did: recipientDid, requester_did: myDid, mediator: mediatorDid })
} catch (e) {
  emit({ event: 'error', step: e.step ?? 'setup', error: errorText(e) })
  process.exit(1)
}

// Pickup 3.0, polled: status-request, then delivery-request (Veramo's builder asks for 2 at a
// time) until the mediator answers with a status instead of a delivery. Veramo's recipient
// handler answers each delivery with messages-received on its own.
const interval = Number(opts['interval-ms'])
const exitAfter = opts['exit-after'] ? Number(opts['exit-after']) : null
for (;;) {
  try {
    const status = await send(createV3StatusRequestMessage(myDid, mediatorDid), 'status-request')
    let count = status?.data?.message_count ?? 0
    let rounds = 0
    while (count > 0 && rounds++ < 1000) {
      const reply = await send(createV3DeliveryRequestMessage(myDid, mediatorDid), 'delivery-request')
      if (!reply || reply.type !== 'https://didcomm.org/messagepickup/3.0/delivery') break
      count -= reply.attachments?.length ?? 0
    }
  } catch (e) {
    emit({ event: 'error', step: 'pickup', error: errorText(e) })
  }
  if (exitAfter !== null && seen.size >= exitAfter) finish(0)
  await new Promise((r) => setTimeout(r, interval))
}
