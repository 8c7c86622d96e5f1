// Shared pieces of the Credo 0.6.3 agents used by the interop harness.
//
// Import order matters: askar-nodejs registers the native binding on import, and
// @credo-ts/askar reads it at module load (importing it first leaves `askar` undefined).
import { askar } from '@openwallet-foundation/askar-nodejs'
import { AskarModule } from '@credo-ts/askar'
import { Agent, ConsoleLogger, LogLevel } from '@credo-ts/core'
import { DidCommHttpOutboundTransport, DidCommModule, DidCommWsOutboundTransport } from '@credo-ts/didcomm'
import { agentDependencies, DidCommHttpInboundTransport } from '@credo-ts/node'
import http from 'node:http'

export const LOOPBACK = '127.0.0.1'

/** Credo's log level from INTEROP_LOG (error by default: the harness prints its own lines). */
export function makeLogger() {
  const name = (process.env.INTEROP_LOG || 'error').toLowerCase()
  const level = LogLevel[name]
  return new ConsoleLogger(typeof level === 'number' ? level : LogLevel.error)
}

/** Listens on 127.0.0.1 with an OS-chosen port (or `port`); resolves once bound. */
export function listenLoopback(server, port = 0) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, LOOPBACK, () => {
      server.off('error', reject)
      resolve(server.address().port)
    })
  })
}

/**
 * Credo's HTTP inbound transport calls `app.listen(port)`, which binds every interface.
 * We bind the server ourselves on 127.0.0.1 first (so the port, and the agent's endpoint,
 * are known before the agent exists) and hand that server back from `app.listen`.
 */
export async function loopbackHttpInbound(port = 0) {
  const transport = new DidCommHttpInboundTransport({ port })
  const server = http.createServer(transport.app)
  const bound = await listenLoopback(server, port)
  transport.app.listen = () => server
  return { transport, server, port: bound }
}

/** FileSystem that keeps Credo's data and cache paths in the given directory (not ~/.afj). */
function fileSystemIn(dir) {
  const Base = agentDependencies.FileSystem
  return class extends Base {
    constructor() {
      super({ baseDataPath: dir, baseCachePath: dir })
    }
  }
}

/**
 * A Credo agent with a file-backed askar sqlite wallet in `dataDir` (so a restart with the
 * same dataDir is the same wallet), HTTP and WS outbound transports, and whatever inbound
 * transports / mediator / mediation-recipient options the caller gives.
 */
export function makeAgent({ label, dataDir, endpoints, inbound = [], mediator, mediationRecipient, extraDidComm = {} }) {
  return new Agent({
    config: { logger: makeLogger(), autoUpdateStorageOnStartup: true, allowInsecureHttpUrls: true },
    dependencies: { ...agentDependencies, FileSystem: fileSystemIn(dataDir) },
    modules: {
      askar: new AskarModule({
        askar,
        store: {
          id: label,
          key: `${label}-interop-key`,
          // Interactive argon2 keeps wallet opening fast; the wallet is a throwaway.
          keyDerivationMethod: 'kdf:argon2i:int',
          database: { type: 'sqlite', config: { path: `${dataDir}/wallet.sqlite` } },
        },
      }),
      didcomm: new DidCommModule({
        ...(endpoints ? { endpoints } : {}),
        transports: {
          inbound,
          outbound: [new DidCommHttpOutboundTransport(), new DidCommWsOutboundTransport()],
        },
        connections: { autoAcceptConnections: true },
        mediator: mediator ?? false,
        mediationRecipient: mediationRecipient ?? false,
        credentials: false,
        proofs: false,
        ...extraDidComm,
      }),
    },
  })
}

/** Reads a JSON request body (bounded). */
export function readJson(req, limit = 1 << 20) {
  return new Promise((resolve, reject) => {
    let size = 0
    const chunks = []
    req.on('data', (c) => {
      size += c.length
      if (size > limit) {
        reject(new Error('request body too large'))
        req.destroy()
      } else chunks.push(c)
    })
    req.on('end', () => {
      if (chunks.length === 0) return resolve({})
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')))
      } catch (e) {
        reject(e)
      }
    })
    req.on('error', reject)
  })
}

export function sendJson(res, status, body) {
  const data = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) })
  res.end(data)
}

/** Resolves when `predicate()` is truthy, polling every `everyMs`; rejects after `timeoutMs`. */
export async function waitFor(predicate, { timeoutMs = 30000, everyMs = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = await predicate()
    if (v) return v
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((r) => setTimeout(r, everyMs))
  }
}

export function errorText(e) {
  if (!e) return String(e)
  const cause = e.cause ? ` (cause: ${errorText(e.cause)})` : ''
  return `${e.name ?? 'Error'}: ${e.message ?? String(e)}${cause}`
}
