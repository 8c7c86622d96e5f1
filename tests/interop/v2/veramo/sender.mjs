// A real Veramo 7.0.1 sender: packs basicmessage 2.0 messages for a recipient DID and sends them
// with Veramo's sendDIDCommMessage, which reads the recipient's DIDCommMessaging service and,
// when its uri is a mediator DID (or it lists routingKeys), wraps a routing 2.0 forward
// anoncrypted to the mediator and POSTs it to the mediator's http uri.
//
//   node sender.mjs --to <recipient DID> [--count 10] [--prefix msg] [--packing authcrypt|anoncrypt] [--enc A256GCM]
//
// Prints one JSON line per message {"event":"sent", "id", "content", "ok", "error"?, "ms"} and a
// last line {"event":"done", "sent", "failed", "ms"}; exit code 1 if any failed.
// The sender's own DID is a did:peer:2 with no service (it expects no answer).
import { parseArgs } from 'node:util'
import { createPeer2, errorText, makeVeramoAgent } from './agent.mjs'

const { values: opts } = parseArgs({
  options: {
    to: { type: 'string' },
    count: { type: 'string', default: '10' },
    prefix: { type: 'string', default: 'msg' },
    packing: { type: 'string', default: 'authcrypt' },
    enc: { type: 'string' },
  },
})
if (!opts.to || !['authcrypt', 'anoncrypt'].includes(opts.packing)) {
  console.error('usage: sender.mjs --to <DID> [--count N] [--prefix P] [--packing authcrypt|anoncrypt] [--enc A256GCM|A256CBC-HS512|XC20P]')
  process.exit(64)
}
const t0 = Date.now()
const emit = (o) => process.stdout.write(JSON.stringify({ ...o, ms: Date.now() - t0 }) + '\n')

const agent = makeVeramoAgent()
const me = await createPeer2(agent, { alias: 'sender' })
let sent = 0
let failed = 0
for (let i = 0; i < Number(opts.count); i++) {
  const content = `${opts.prefix}-${String(i).padStart(4, '0')}`
  const message = {
    id: crypto.randomUUID(),
    type: 'https://didcomm.org/basicmessage/2.0/message',
    ...(opts.packing === 'authcrypt' ? { from: me.did } : {}),
    to: [opts.to],
    created_time: Math.floor(Date.now() / 1000),
    body: { content },
  }
  try {
    const packedMessage = await agent.packDIDCommMessage({ message, packing: opts.packing, options: opts.enc ? { enc: opts.enc } : undefined })
    await agent.sendDIDCommMessage({ packedMessage, recipientDidUrl: opts.to, messageId: message.id })
    sent++
    emit({ event: 'sent', id: message.id, content, ok: true })
  } catch (e) {
    failed++
    emit({ event: 'sent', id: message.id, content, ok: false, error: errorText(e) })
  }
}
emit({ event: 'done', sent, failed, from: me.did })
process.exit(failed ? 1 : 0)
