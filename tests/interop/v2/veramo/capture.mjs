// Captures real DIDComm v2 envelopes made by Veramo 7.0.1 (@veramo/did-comm) into
// tests/fixtures/didcomm/v2/veramo/, for the Rust tests to unpack.
//
//   cd tests/interop/v2/veramo && node capture.mjs [--out DIR]
//
// Everything goes through Veramo's own API: packDIDCommMessage for the envelope matrix and
// the JWS, sendDIDCommMessage (with its HTTP transport) for what it puts on the wire towards
// a mediator (forwards, coordinate-mediation, pickup, trust-ping), handleMessage for what its
// pickup client answers to a `delivery`. The "mediator" here is only an HTTP listener on
// 127.0.0.1 that records each POST (method, content-type, body) and answers 202 with no body:
// nothing of the mediator's side is captured or imitated. Every captured envelope is unpacked
// again by Veramo (peer_unpacked), so a fixture is known to be one Veramo accepts.
//
// Each fixture file carries the private JWKs of the keys that can open it (throwaway keys
// made for this run) and the DID documents, as Veramo resolves them, of every DID it names.
import http from 'node:http'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import {
  createMediateRequestMessage,
  createV3DeliveryRequestMessage,
  createV3MediateRequestMessage,
  createV3RecipientQueryMessage,
  createV3RecipientUpdateMessage,
  createV3StatusRequestMessage,
} from '@veramo/did-comm'
// Not re-exported by the package's index (its `exports` map hides it): imported by file path.
import { createTrustPingMessage } from './node_modules/@veramo/did-comm/build/protocols/trust-ping-message-handler.js'
import { KMS, createDidKey, createPeer2, decodeB64uJson, errorText, makeVeramoAgent, resolveDoc } from './agent.mjs'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const { values: opts } = parseArgs({
  options: { out: { type: 'string', default: path.resolve(HERE, '../../../fixtures/didcomm/v2/veramo') } },
})
const OUT = opts.out
const LIB = '@veramo/did-comm 7.0.1'
const ts = () => new Date().toISOString()

const agent = makeVeramoAgent()
const docs = new Map() // did -> document as Veramo resolves it
async function docOf(did) {
  const base = did.split('#')[0]
  if (!docs.has(base)) docs.set(base, await resolveDoc(agent, base))
  return docs.get(base)
}
async function docsFor(...dids) {
  const out = {}
  for (const d of dids.flat().filter(Boolean)) {
    const base = d.split('#')[0]
    out[base] = await docOf(base)
  }
  return out
}

/** The kid -> private JWK map of a Veramo did:peer:2 made by createPeer2 (E first: #key-1 is X25519). */
function peer2Keys(p) {
  return [
    { kid: `${p.did}#key-1`, purpose: 'keyAgreement', private_jwk: p.agreement.jwk },
    { kid: `${p.did}#key-2`, purpose: 'authentication', private_jwk: p.auth.jwk },
  ]
}
/** Same for a did:key: the verification method ids as Veramo's did:key resolver names them. */
async function didKeyKeys(k) {
  const doc = await docOf(k.did)
  const out = []
  for (const vm of doc.verificationMethod) {
    const isAgreement = (doc.keyAgreement ?? []).includes(vm.id)
    const entry = { kid: vm.id, purpose: isAgreement ? 'keyAgreement' : 'authentication' }
    if (!isAgreement) entry.private_jwk = k.key.jwk
    else {
      entry.private_jwk = ed25519SeedToX25519(k.key.jwk)
      if (entry.private_jwk.x !== vm.publicKeyJwk.x) throw new Error(`derived X25519 key does not match ${vm.id}`)
      entry.derived_from = 'the Ed25519 key of the did:key: X25519 secret = clamp(SHA-512(seed)[0..32]), public = the birational map of the Ed25519 public key'
    }
    out.push(entry)
  }
  return out
}

/** The X25519 private JWK that an Ed25519 private JWK converts to (as libsodium does). */
function ed25519SeedToX25519(edJwk) {
  const h = crypto.createHash('sha512').update(Buffer.from(edJwk.d, 'base64url')).digest().subarray(0, 32)
  h[0] &= 248
  h[31] &= 127
  h[31] |= 64
  const der = Buffer.concat([Buffer.from('302e020100300506032b656e04220420', 'hex'), h])
  return crypto.createPrivateKey({ key: der, format: 'der', type: 'pkcs8' }).export({ format: 'jwk' })
}

/** A did:key multibase for a fresh NIST key (compressed point behind its multicodec). */
function nistDidKey(curve, codec) {
  const jwk = crypto.generateKeyPairSync('ec', { namedCurve: curve }).publicKey.export({ format: 'jwk' })
  const x = Buffer.from(jwk.x, 'base64url')
  const y = Buffer.from(jwk.y, 'base64url')
  const point = Buffer.concat([Buffer.from([y[y.length - 1] & 1 ? 3 : 2]), x])
  return 'z' + base58(Buffer.concat([Buffer.from(codec), point]))
}
function base58(buf) {
  const A = '123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz'
  let n = BigInt('0x' + (buf.toString('hex') || '0'))
  let s = ''
  while (n > 0n) { s = A[Number(n % 58n)] + s; n /= 58n }
  for (const b of buf) { if (b !== 0) break; s = '1' + s }
  return s
}

/**
 * Veramo's unpack on Indicio's fixtures: the recipient DID is imported into a fresh agent with
 * the private keys the fixture carries (Veramo unpacks only for DIDs it manages).
 */
async function crossIndicio(dir) {
  if (!fs.existsSync(dir)) return { skipped: `${dir} not found (run indicio/capture.py first)` }
  const out = {}
  for (const f of fs.readdirSync(dir).sort()) {
    if (!f.endsWith('.json')) continue
    const fx = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'))
    if (!['anoncrypt', 'authcrypt', 'forward', 'client-message'].includes(fx.kind)) continue
    const a = makeVeramoAgent()
    try {
      const byDid = new Map()
      for (const k of fx.recipient_keys ?? []) {
        const did = k.kid.split('#')[0]
        const type = k.private_jwk.crv
        if (!byDid.has(did)) byDid.set(did, [])
        byDid.get(did).push({ kid: k.kid, kms: KMS, type, privateKeyHex: Buffer.from(k.private_jwk.d, 'base64url').toString('hex'), publicKeyHex: Buffer.from(k.private_jwk.x, 'base64url').toString('hex') })
      }
      for (const [did, keys] of byDid) await a.didManagerImport({ did, provider: 'did:peer', keys, services: [] })
      const r = await a.unpackDIDCommMessage({ message: fx.envelope })
      out[f.replace(/\.json$/, '')] = `ok (${r.metaData.packing})`
    } catch (e) {
      out[f.replace(/\.json$/, '')] = errorText(e)
    }
  }
  return out
}

const written = []
function write(name, fixture) {
  const file = path.join(OUT, `${name}.json`)
  fs.writeFileSync(file, JSON.stringify({ peer: 'veramo', library: LIB, case: name, generated_by: 'tests/interop/v2/veramo/capture.mjs', generated_at: ts(), ...fixture }, null, 2) + '\n')
  written.push(name)
}

/** Parses an envelope string; for a JWE/JWS also decodes its protected header. */
function describe(envelope) {
  const json = JSON.parse(envelope)
  const out = { envelope, envelope_json: json }
  if (json.protected) out.protected = decodeB64uJson(json.protected)
  else if (json.signatures?.[0]?.protected) out.protected = decodeB64uJson(json.signatures[0].protected)
  return out
}

async function unpackCheck(envelope) {
  const r = await agent.unpackDIDCommMessage({ message: envelope })
  return { packing: r.metaData.packing, message: r.message }
}

// ------------------------------------------------------------------ the capture "mediator"
const posts = []
const server = http.createServer((req, res) => {
  const chunks = []
  req.on('data', (c) => chunks.push(c))
  req.on('end', () => {
    posts.push({ method: req.method, path: req.url, content_type: req.headers['content-type'] ?? null, body: Buffer.concat(chunks).toString('utf8') })
    res.writeHead(202, { 'content-length': '0' })
    res.end()
  })
})
await new Promise((r) => server.listen(0, '127.0.0.1', r))
const PORT = server.address().port
const ENDPOINT = `http://127.0.0.1:${PORT}/`

/** Sends with Veramo and returns the one POST it made. */
async function sendAndCapture(packedMessage, recipientDidUrl, messageId) {
  const before = posts.length
  await agent.sendDIDCommMessage({ packedMessage, recipientDidUrl, messageId })
  const got = posts.slice(before)
  if (got.length !== 1) throw new Error(`expected one POST for ${messageId}, got ${got.length}`)
  return got[0]
}

try {
  fs.mkdirSync(OUT, { recursive: true })
  for (const f of fs.readdirSync(OUT)) if (f.endsWith('.json')) fs.unlinkSync(path.join(OUT, f))

  const recipient = await createPeer2(agent, { alias: 'recipient' })
  const sender = await createPeer2(agent, { alias: 'sender' })
  const keyRecipient = await createDidKey(agent, 'Ed25519', 'key-recipient')
  const k1Signer = await createDidKey(agent, 'Secp256k1', 'k1-signer')
  const senderPublic = (p) => [{ kid: `${p.did}#key-1`, purpose: 'keyAgreement', public_jwk: p.agreement.publicJwk }, { kid: `${p.did}#key-2`, purpose: 'authentication', public_jwk: p.auth.publicJwk }]

  const basic = (from, to, content) => ({
    id: crypto.randomUUID(),
    type: 'https://didcomm.org/basicmessage/2.0/message',
    ...(from ? { from } : {}),
    to: Array.isArray(to) ? to : [to],
    created_time: Math.floor(Date.now() / 1000),
    body: { content },
  })

  // ---------------------------------------------------------------- envelope matrix
  // Veramo's packDIDCommMessage: alg ECDH-ES / ECDH-1PU with key wrap A256KW or XC20PKW
  // (the latter is Veramo's own, not in the DIDComm spec), enc A256CBC-HS512 / A256GCM / XC20P.
  // X25519 only (its encrypter table has no P-256/P-384 recipient: "not_supported").
  const matrix = []
  for (const packing of ['anoncrypt', 'authcrypt']) {
    for (const wrap of ['A256KW', 'XC20PKW']) {
      for (const enc of ['A256CBC-HS512', 'A256GCM', 'XC20P']) {
        const alg = `${packing === 'anoncrypt' ? 'ECDH-ES' : 'ECDH-1PU'}+${wrap}`
        const msg = basic(packing === 'authcrypt' ? sender.did : null, recipient.did, `${packing} ${alg} ${enc}`)
        const { message: envelope } = await agent.packDIDCommMessage({ message: msg, packing, options: { alg, enc } })
        const d = describe(envelope)
        const notes = []
        if (wrap === 'XC20PKW') notes.push('key wrap XC20PKW is a Veramo extension, not in DIDComm v2; a mediator may refuse it with a problem report')
        if (packing === 'authcrypt') notes.push('ECDH-1PU as Veramo does it: the KDF is ECDH-1PU draft-03 (no cc_tag in the KDF input), for every enc, including A256CBC-HS512 where DIDComm v2 requires draft-04 (tag in the KDF)')
        if (packing === 'authcrypt' && enc !== 'A256CBC-HS512') notes.push(`authcrypt with ${enc}: DIDComm v2 allows only A256CBC-HS512 for ECDH-1PU`)
        notes.push('one ephemeral key for all recipients: epk and alg sit in the protected header, recipients[].header has only kid')
        const name = `${packing}_${alg.replace('+', '_')}_${enc}_X25519`
        write(name, {
          kind: packing,
          alg,
          enc,
          curve: 'X25519',
          standard: wrap === 'A256KW' && (packing === 'anoncrypt' || enc === 'A256CBC-HS512'),
          plaintext: msg,
          ...d,
          recipient_keys: peer2Keys(recipient).filter((k) => k.purpose === 'keyAgreement'),
          ...(packing === 'authcrypt' ? { sender_keys: senderPublic(sender) } : {}),
          dids: await docsFor(recipient.did, packing === 'authcrypt' ? sender.did : null),
          peer_unpacked: await unpackCheck(envelope),
          notes,
        })
        matrix.push(name)
      }
    }
  }
  // Curves Veramo cannot pack for: record the refusal so the README's claim is checked.
  const refused = {}
  for (const [curve, codec] of [['P-256', [0x80, 0x24]], ['P-384', [0x81, 0x24]]]) {
    const did = `did:key:${nistDidKey(curve, codec)}`
    try {
      await agent.packDIDCommMessage({ message: basic(null, did, curve), packing: 'anoncrypt', options: { alg: 'ECDH-ES+A256KW', enc: 'A256CBC-HS512' } })
      refused[curve] = `packed for ${did} (unexpected)`
    } catch (e) {
      refused[curve] = `${did}: ${errorText(e)}`
    }
  }

  // did:key recipient (Ed25519 did:key: keyAgreement is the derived X25519 key) and two recipients.
  for (const enc of ['A256CBC-HS512', 'A256GCM']) {
    const msg = basic(null, keyRecipient.did, `anoncrypt to did:key ${enc}`)
    const { message: envelope } = await agent.packDIDCommMessage({ message: msg, packing: 'anoncrypt', options: { alg: 'ECDH-ES+A256KW', enc } })
    write(`anoncrypt_ECDH-ES_A256KW_${enc}_X25519_didkey`, {
      kind: 'anoncrypt', alg: 'ECDH-ES+A256KW', enc, curve: 'X25519', standard: true,
      plaintext: msg, ...describe(envelope),
      recipient_keys: await didKeyKeys(keyRecipient),
      dids: await docsFor(keyRecipient.did),
      peer_unpacked: await unpackCheck(envelope),
      notes: ['recipient is an Ed25519 did:key; Veramo encrypts to the X25519 key its did:key resolver derives (kid did:key:z6Mk...#z6LS...)'],
    })
  }
  {
    const msg = basic(sender.did, [recipient.did, keyRecipient.did], 'authcrypt to two DIDs')
    const { message: envelope } = await agent.packDIDCommMessage({ message: msg, packing: 'authcrypt', options: { alg: 'ECDH-1PU+A256KW', enc: 'A256CBC-HS512' } })
    write('authcrypt_ECDH-1PU_A256KW_A256CBC-HS512_X25519_two_recipients', {
      kind: 'authcrypt', alg: 'ECDH-1PU+A256KW', enc: 'A256CBC-HS512', curve: 'X25519', standard: true,
      plaintext: msg, ...describe(envelope),
      recipient_keys: [...peer2Keys(recipient).filter((k) => k.purpose === 'keyAgreement'), ...(await didKeyKeys(keyRecipient))],
      sender_keys: senderPublic(sender),
      dids: await docsFor(recipient.did, keyRecipient.did, sender.did),
      peer_unpacked: await unpackCheck(envelope),
      notes: ['two recipients, one shared epk in the protected header; either recipient key opens it; no apu/apv set by Veramo (did-jwt leaves them out)'],
    })
  }

  // ---------------------------------------------------------------- plaintext and JWS
  {
    const msg = basic(sender.did, recipient.did, 'plaintext')
    const { message: envelope } = await agent.packDIDCommMessage({ message: msg, packing: 'none' })
    write('plaintext', { kind: 'plaintext', plaintext: msg, envelope, envelope_json: JSON.parse(envelope), dids: await docsFor(sender.did, recipient.did), peer_unpacked: await unpackCheck(envelope), notes: ['packing "none": the message with typ application/didcomm-plain+json added'] })
  }
  for (const [signer, alg, keys] of [
    [sender, 'EdDSA', peer2Keys(sender).filter((k) => k.purpose === 'authentication')],
    [k1Signer, 'ES256K', [{ kid: null, purpose: 'authentication', private_jwk: k1Signer.key.jwk }]],
  ]) {
    const msg = basic(signer.did, recipient.did, `signed ${alg}`)
    const { message: envelope } = await agent.packDIDCommMessage({ message: msg, packing: 'jws' })
    const d = describe(envelope)
    if (keys[0].kid === null) keys[0].kid = d.protected.kid
    write(`jws_${alg}`, {
      kind: 'jws', alg, plaintext: msg, ...d, signer_keys: keys, dids: await docsFor(signer.did),
      peer_unpacked: await unpackCheck(envelope),
      notes: ['flattened JWS JSON (protected, payload, signature); protected = {alg, kid, typ: application/didcomm-signed+json}; Veramo signs only with Ed25519 (EdDSA) or Secp256k1 (ES256K)'],
    })
  }

  // ---------------------------------------------------------------- through a mediator
  const mediator = await createPeer2(agent, { alias: 'mediator', service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: ENDPOINT, accept: ['didcomm/v2'] } } })
  // v2.1 shape: the recipient's service uri is the mediator's DID.
  const routedByDid = await createPeer2(agent, { alias: 'routed-by-did', service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: mediator.did, accept: ['didcomm/v2'] } } })
  // routingKeys shape: an http uri and the mediator's key agreement key as routing key.
  const routedByKey = await createPeer2(agent, { alias: 'routed-by-key', service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: ENDPOINT, accept: ['didcomm/v2'], routingKeys: [`${mediator.did}#key-1`] } } })
  for (const [target, label, note] of [
    [routedByDid, 'service_uri_is_mediator_did', "the recipient's DIDCommMessaging service has uri = the mediator's did:peer:2; Veramo resolves that DID, wraps a forward {next: <recipient DID>} anoncrypted to the mediator's key agreement keys, POSTs it to the mediator's http uri"],
    [routedByKey, 'routing_keys', "the recipient's service has uri = the mediator's http endpoint and routingKeys = [<mediator DID>#key-1]; Veramo wraps one forward {next: <recipient DID>} anoncrypted to that kid only"],
  ]) {
    const msg = basic(sender.did, target.did, `through the mediator (${label})`)
    const packed = await agent.packDIDCommMessage({ message: msg, packing: 'authcrypt' })
    const post = await sendAndCapture(packed, target.did, msg.id)
    const outer = await unpackCheck(post.body)
    const inner = JSON.stringify(outer.message.attachments[0].data.json)
    write(`forward_${label}`, {
      kind: 'forward',
      http: { method: post.method, path: post.path, content_type: post.content_type },
      ...describe(post.body),
      forward_plaintext: outer.message,
      inner_envelope: packed.message,
      inner_plaintext: msg,
      recipient_keys: peer2Keys(mediator).filter((k) => k.purpose === 'keyAgreement'),
      final_recipient_keys: peer2Keys(target).filter((k) => k.purpose === 'keyAgreement'),
      sender_keys: senderPublic(sender),
      dids: await docsFor(mediator.did, target.did, sender.did),
      peer_unpacked: { packing: outer.packing, inner_packing: (await unpackCheck(inner)).packing },
      notes: [note, 'the forward has no typ, no expires_time, no attachment id; attachments[0].media_type is the inner typ (application/didcomm-encrypted+json); default enc of the outer anoncrypt is A256GCM'],
    })
  }

  // ---------------------------------------------------------------- the mediation client
  // A mediatee DID with no service (it has no endpoint), as a Veramo wallet starts.
  const mediatee = await createPeer2(agent, { alias: 'mediatee' })
  const newRecipient = await createPeer2(agent, { alias: 'mediatee-routed', service: { type: 'DIDCommMessaging', serviceEndpoint: { uri: mediator.did, accept: ['didcomm/v2'] } } })
  const clientMessages = [
    ['coordinate-mediation_3.0_mediate-request', createV3MediateRequestMessage(mediatee.did, mediator.did), 'no return_route: Veramo expects the grant in the HTTP response anyway'],
    ['coordinate-mediation_3.0_recipient-update', createV3RecipientUpdateMessage(mediatee.did, mediator.did, [{ recipient_did: newRecipient.did, action: 'add' }]), 'return_route all'],
    ['coordinate-mediation_3.0_recipient-query', createV3RecipientQueryMessage(mediatee.did, mediator.did), 'no return_route'],
    ['coordinate-mediation_2.0_mediate-request', createMediateRequestMessage(mediatee.did, mediator.did), 'Veramo\'s 2.0 client: return_route all'],
    ['messagepickup_3.0_status-request', createV3StatusRequestMessage(mediatee.did, mediator.did), 'return_route all, empty body (no recipient_did)'],
    ['messagepickup_3.0_delivery-request', createV3DeliveryRequestMessage(mediatee.did, mediator.did), 'return_route all, body.limit fixed at 2 by Veramo'],
    ['trust-ping_2.0_ping', createTrustPingMessage(mediatee.did, mediator.did), 'body.responseRequested (camelCase; the spec says response_requested); no return_route'],
  ]
  for (const [name, msg, note] of clientMessages) {
    const packed = await agent.packDIDCommMessage({ message: msg, packing: 'authcrypt' })
    const post = await sendAndCapture(packed, mediator.did, msg.id)
    write(`client_${name}`, {
      kind: 'client-message',
      http: { method: post.method, path: post.path, content_type: post.content_type },
      plaintext: msg,
      ...describe(post.body),
      recipient_keys: peer2Keys(mediator).filter((k) => k.purpose === 'keyAgreement'),
      sender_keys: senderPublic(mediatee),
      dids: await docsFor(mediator.did, mediatee.did, name.includes('recipient-update') ? newRecipient.did : null),
      peer_unpacked: await unpackCheck(post.body),
      notes: [note, 'authcrypt ECDH-1PU+A256KW / A256GCM (Veramo\'s default enc), POSTed to the mediator DID\'s http service uri'],
    })
  }
  // messages-received: what Veramo's PickupRecipientMessageHandler sends after a delivery.
  {
    const forwarded = basic(sender.did, mediatee.did, 'delivered through pickup')
    const fwdPacked = await agent.packDIDCommMessage({ message: forwarded, packing: 'authcrypt' })
    const attachmentId = crypto.randomUUID()
    const delivery = {
      id: crypto.randomUUID(),
      type: 'https://didcomm.org/messagepickup/3.0/delivery',
      from: mediator.did,
      to: [mediatee.did],
      thid: crypto.randomUUID(),
      body: {},
      attachments: [{ id: attachmentId, media_type: 'application/didcomm-encrypted+json', data: { json: JSON.parse(fwdPacked.message) } }],
    }
    const deliveryPacked = await agent.packDIDCommMessage({ message: delivery, packing: 'authcrypt' })
    const before = posts.length
    await agent.handleMessage({ raw: deliveryPacked.message, save: false })
    const got = posts.slice(before)
    if (got.length !== 1) throw new Error(`Veramo answered a delivery with ${got.length} POSTs`)
    const post = got[0]
    const opened = await unpackCheck(post.body)
    write('client_messagepickup_3.0_messages-received', {
      kind: 'client-message',
      http: { method: post.method, path: post.path, content_type: post.content_type },
      plaintext: opened.message,
      ...describe(post.body),
      answered_delivery: delivery,
      recipient_keys: peer2Keys(mediator).filter((k) => k.purpose === 'keyAgreement'),
      sender_keys: senderPublic(mediatee),
      dids: await docsFor(mediator.did, mediatee.did),
      peer_unpacked: { packing: opened.packing },
      notes: ['sent by Veramo itself (PickupRecipientMessageHandler) when handleMessage got a delivery: message_id_list = the attachment ids; thid = the delivery id; return_route all; POSTed to the mediator DID\'s service, never on a return route'],
    })
  }

  // ---------------------------------------------------------------- DID documents
  const didFixtures = {
    'peer2_no_service': recipient,
    'peer2_service_http': mediator,
    'peer2_service_uri_did': routedByDid,
    'peer2_service_routing_keys': routedByKey,
  }
  for (const [name, p] of Object.entries(didFixtures)) {
    write(`did_${name}`, { kind: 'did', did: p.did, document: await docOf(p.did), keys: peer2Keys(p), notes: ['Veramo did:peer:2: E (X25519 keyAgreement) before V (Ed25519 authentication), so #key-1 is the X25519 key; service abbreviated {t, s:{uri, a, r}} with no id; the resolver (@aviarytech/did-peer 0.0.22) gives relative ids (#key-N, #service) with an @base context'] })
  }
  write('did_key_ed25519', { kind: 'did', did: keyRecipient.did, document: await docOf(keyRecipient.did), keys: await didKeyKeys(keyRecipient), notes: ['Veramo did:key resolver: JsonWebKey2020 methods, absolute ids, keyAgreement = derived X25519 (#z6LS...)'] })
  write('did_key_secp256k1', { kind: 'did', did: k1Signer.did, document: await docOf(k1Signer.did), keys: [{ kid: null, purpose: 'authentication', private_jwk: k1Signer.key.jwk }], notes: [] })
  const p0 = await agent.didManagerCreate({ provider: 'did:peer', options: { num_algo: 0 } })
  write('did_peer0', { kind: 'did', did: p0.did, document: await docOf(p0.did), keys: [], notes: ['did:peer:0 as Veramo creates it (its default num_algo)'] })

  write('_summary', {
    kind: 'summary',
    matrix,
    refused_curves: refused,
    veramo_unpacks_indicio_fixtures: await crossIndicio(path.resolve(OUT, '../indicio')),
    files: written.slice(),
    notes: ['regenerate: cd tests/interop/v2/veramo && node capture.mjs'],
  })
  console.log(`wrote ${written.length} fixtures to ${OUT}`)
} catch (e) {
  console.error(`capture failed: ${errorText(e)}`)
  console.error(e?.stack)
  process.exitCode = 1
} finally {
  server.close()
}
