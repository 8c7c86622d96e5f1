// A minimal real Veramo 7.0.1 agent for DIDComm v2: in-memory keys (local KMS), did:peer
// (numalgo 0/2) and did:key identifiers, the did:peer + did:key resolvers, the DIDComm plugin
// with its HTTP transport, and a message handler chain with Veramo's own protocol handlers.
// Shared by capture.mjs (fixtures), mediatee.mjs / sender.mjs (drivers) and mediator.mjs (a
// reference mediator built from Veramo's mediator-side handlers).
//
// Keys are created here from node:crypto so that the private half can be written into a
// fixture (the Rust side unpacks with it); Veramo imports them into its local KMS.
import { createAgent } from '@veramo/core'
import { DIDManager, MemoryDIDStore } from '@veramo/did-manager'
import { KeyManager, MemoryKeyStore, MemoryPrivateKeyStore } from '@veramo/key-manager'
import { KeyManagementSystem } from '@veramo/kms-local'
import { PeerDIDProvider, getResolver as getPeerResolver } from '@veramo/did-provider-peer'
import { KeyDIDProvider, getDidKeyResolver } from '@veramo/did-provider-key'
import { DIDResolverPlugin } from '@veramo/did-resolver'
import { MessageHandler } from '@veramo/message-handler'
import {
  CoordinateMediationV3RecipientMessageHandler,
  DIDComm,
  DIDCommHttpTransport,
  DIDCommMessageHandler,
  PickupRecipientMessageHandler,
  TrustPingMessageHandler,
} from '@veramo/did-comm'
import { DataStoreJson } from '@veramo/data-store-json'
import { Resolver } from 'did-resolver'
import crypto from 'node:crypto'

export const KMS = 'local'

/**
 * MemoryDIDStore hands out the stored identifier object itself, and @veramo/utils'
 * convertIdentifierEncryptionKeys (run by every authcrypt pack and every unpack) rewrites its
 * Ed25519 key into X25519 in place: after one encrypted message the DID can no longer sign a
 * JWS ("key_not_found: could not locate a suitable signing key"). A store that returns copies
 * keeps the stored keys intact.
 */
class CopyingDIDStore extends MemoryDIDStore {
  async getDID(args) {
    return structuredClone(await super.getDID(args))
  }
  async listDIDs(args) {
    return structuredClone(await super.listDIDs(args))
  }
}

/**
 * The agent. `handlers` are appended after DIDCommMessageHandler (which unpacks) in the
 * message-handler chain; by default the recipient-side handlers a Veramo wallet uses.
 */
export function makeVeramoAgent({ handlers, extraPlugins = [] } = {}) {
  const messageHandlers = [
    new DIDCommMessageHandler(),
    ...(handlers ?? [
      new TrustPingMessageHandler(),
      new CoordinateMediationV3RecipientMessageHandler(),
      new PickupRecipientMessageHandler(),
    ]),
  ]
  // DataStoreJson keeps messages in a plain object: Veramo's mediation client looks its
  // mediate-request up there when the grant arrives, and the pickup mediator queues in it.
  const store = { notifyUpdate: async () => {} }
  return createAgent({
    plugins: [
      new KeyManager({
        store: new MemoryKeyStore(),
        kms: { [KMS]: new KeyManagementSystem(new MemoryPrivateKeyStore()) },
      }),
      new DIDManager({
        store: new CopyingDIDStore(),
        defaultProvider: 'did:peer',
        providers: {
          'did:peer': new PeerDIDProvider({ defaultKms: KMS }),
          'did:key': new KeyDIDProvider({ defaultKms: KMS }),
        },
      }),
      new DIDResolverPlugin({
        resolver: new Resolver({ ...getPeerResolver(), ...getDidKeyResolver() }),
      }),
      new DIDComm({ transports: [new DIDCommHttpTransport()] }),
      new MessageHandler({ messageHandlers }),
      new DataStoreJson(store),
      ...extraPlugins,
    ],
  })
}

const b64u = (buf) => Buffer.from(buf).toString('base64url')
const fromB64u = (s) => Buffer.from(s, 'base64url')

/** A fresh key pair: { type (Veramo's name), jwk (private, with d), publicJwk, privateKeyHex }. */
export function newKey(type) {
  let jwk
  if (type === 'X25519' || type === 'Ed25519') {
    jwk = crypto.generateKeyPairSync(type.toLowerCase()).privateKey.export({ format: 'jwk' })
  } else if (type === 'Secp256k1') {
    jwk = crypto.generateKeyPairSync('ec', { namedCurve: 'secp256k1' }).privateKey.export({ format: 'jwk' })
  } else {
    throw new Error(`newKey: unsupported ${type}`)
  }
  const { d, ...publicJwk } = jwk
  // Veramo's local KMS takes the 32-byte secret (Ed25519: the seed) as hex.
  return { type, jwk, publicJwk, privateKeyHex: fromB64u(d).toString('hex') }
}

/**
 * A did:peer:2 made by Veramo's PeerDIDProvider from fresh keys (X25519 agreement + Ed25519
 * authentication), with an optional DIDCommMessaging service. Returns the identifier and the
 * keys (private JWKs) so fixtures can carry them.
 */
export async function createPeer2(agent, { alias, service } = {}) {
  const agreement = newKey('X25519')
  const auth = newKey('Ed25519')
  const id = await agent.didManagerCreate({
    provider: 'did:peer',
    alias,
    options: {
      num_algo: 2,
      service,
      key: { privateKeyHex: auth.privateKeyHex },
      agreementKey: { privateKeyHex: agreement.privateKeyHex },
    },
  })
  return { identifier: id, did: id.did, agreement, auth }
}

/** A did:key (Ed25519 or Secp256k1) made by Veramo's KeyDIDProvider from a fresh key. */
export async function createDidKey(agent, type = 'Ed25519', alias) {
  const key = newKey(type)
  const id = await agent.didManagerCreate({
    provider: 'did:key',
    alias,
    options: { keyType: type, privateKeyHex: key.privateKeyHex },
  })
  return { identifier: id, did: id.did, key }
}

/** Resolves a DID with the agent's resolver; throws with the resolver's message. */
export async function resolveDoc(agent, did) {
  const r = await agent.resolveDid({ didUrl: did })
  if (!r.didDocument) throw new Error(`cannot resolve ${did}: ${JSON.stringify(r.didResolutionMetadata)}`)
  return r.didDocument
}

/** Decodes a JOSE base64url JSON blob. */
export const decodeB64uJson = (s) => JSON.parse(fromB64u(s).toString('utf8'))
export { b64u, fromB64u }

/** The out-of-band 2.0 invitation in a URL's `_oob` parameter (or `oob`). */
export function parseOobUrl(url) {
  const u = new URL(url)
  const raw = u.searchParams.get('_oob') ?? u.searchParams.get('oob')
  if (!raw) throw new Error(`no _oob parameter in ${url.slice(0, 120)}`)
  return JSON.parse(fromB64u(raw).toString('utf8'))
}

/** Error text with the causes Veramo nests (AggregateError of transport errors). */
export function errorText(e) {
  if (!e) return String(e)
  let s = e.message ?? String(e)
  if (e.cause) {
    const inner = e.cause.errors ? e.cause.errors.map((x) => x?.message ?? String(x)).join('; ') : errorText(e.cause)
    s += ` (${inner})`
  }
  return s
}
