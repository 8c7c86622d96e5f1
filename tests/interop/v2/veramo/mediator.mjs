// Veramo 7.0.1's own DIDComm v2 mediator (its mediator-side handlers: coordinate-mediation 3.0
// and 2.0, routing 2.0 forward, messagepickup 3.0 polled, trust-ping 2.0, with its
// MediationManagerPlugin), behind mailroom's outer interface, as a reference for the v2 drivers
// (the way credo/mediator.mjs is one for the v1 scenarios). HTTP only: Veramo has no WebSocket
// transport and no pickup live mode.
//
//   node mediator.mjs [--port 0]
//
// Prints `READY {"url": "http://127.0.0.1:P", "did": "<mediator did:peer:2>"}` once listening.
//   GET  /invitation?didcomm=v2  -> {"invitation_url": "http://127.0.0.1:P/?_oob=...", "invitation": {...}}
//   GET  /ready                  -> 200
//   POST /                       a DIDComm v2 message; the answer Veramo's handler produced (its
//                                "ReturnRouteResponse" metadata) comes back in the response body
//                                with content-type application/didcomm-encrypted+json, else 202.
// Veramo's handlers answer whether or not the request asked for return_route (its
// mediate-request does not): this is what Veramo's remote-server MessagingRouter does.
import http from 'node:http'
import { parseArgs } from 'node:util'
import {
  CoordinateMediationV3MediatorMessageHandler,
  CoordinateMediationMediatorMessageHandler,
  PickupMediatorMessageHandler,
  RoutingMessageHandler,
  TrustPingMessageHandler,
} from '@veramo/did-comm'
import { MediationManagerPlugin } from '@veramo/mediation-manager'
import { KeyValueStore } from '@veramo/kv-store'
import { b64u, createPeer2, errorText, makeVeramoAgent } from './agent.mjs'

const { values: opts } = parseArgs({ options: { port: { type: 'string', default: '0' } } })
const log = (o) => console.error(JSON.stringify({ t: new Date().toISOString(), ...o }))

const mediation = new MediationManagerPlugin(
  true, // grant every request (isMediateDefaultGrantAll)
  new KeyValueStore({ namespace: 'policy', store: new Map() }),
  new KeyValueStore({ namespace: 'mediation', store: new Map() }),
  new KeyValueStore({ namespace: 'recipients', store: new Map() }),
)
const agent = makeVeramoAgent({
  handlers: [
    new TrustPingMessageHandler(),
    new CoordinateMediationV3MediatorMessageHandler(),
    new CoordinateMediationMediatorMessageHandler(),
    new RoutingMessageHandler(),
    new PickupMediatorMessageHandler(),
  ],
  extraPlugins: [mediation],
})

const server = http.createServer()
await new Promise((r) => server.listen(Number(opts.port), '127.0.0.1', r))
const url = `http://127.0.0.1:${server.address().port}`
const mediator = await createPeer2(agent, {
  alias: 'mediator',
  service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: `${url}/`, accept: ['didcomm/v2'] } },
})
const invitation = {
  type: 'https://didcomm.org/out-of-band/2.0/invitation',
  id: crypto.randomUUID(),
  from: mediator.did,
  body: { goal_code: 'request-mediate', goal: 'RequestMediate', label: 'veramo-reference-mediator', accept: ['didcomm/v2'] },
}
const invitationUrl = `${url}/?_oob=${b64u(JSON.stringify(invitation))}`

server.on('request', (req, res) => {
  const chunks = []
  req.on('data', (c) => chunks.push(c))
  req.on('end', async () => {
    const u = new URL(req.url, url)
    try {
      if (req.method === 'GET' && u.pathname === '/invitation') {
        res.writeHead(200, { 'content-type': 'application/json' })
        return res.end(JSON.stringify({ invitation_url: invitationUrl, invitation }))
      }
      if (req.method === 'GET' && u.pathname === '/ready') {
        res.writeHead(200)
        return res.end('ready')
      }
      if (req.method !== 'POST') {
        res.writeHead(405)
        return res.end()
      }
      const raw = Buffer.concat(chunks).toString('utf8')
      const message = await agent.handleMessage({ raw, save: false })
      const rr = message.metaData?.find((m) => m.type === 'ReturnRouteResponse')
      log({ in: message.type, from: message.from, returnRoute: message.returnRoute ?? null, answered: !!rr })
      if (rr?.value) {
        const { message: packed, contentType } = JSON.parse(rr.value)
        res.writeHead(200, { 'content-type': contentType })
        return res.end(packed)
      }
      res.writeHead(202)
      res.end()
    } catch (e) {
      log({ error: errorText(e) })
      res.writeHead(400, { 'content-type': 'text/plain' })
      res.end(errorText(e))
    }
  })
})

process.on('SIGTERM', () => process.exit(0))
process.on('SIGINT', () => process.exit(0))
console.log(`READY ${JSON.stringify({ url, did: mediator.did, invitation_url: invitationUrl })}`)
