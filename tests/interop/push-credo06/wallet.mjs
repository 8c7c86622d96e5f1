// A Credo 0.6.3 wallet with @credo-ts/push-notifications 0.7.1 (the plugin BC Wallet and
// Bifold run), mediated by mailroom: it takes mediation from the invitation in argv[2],
// registers the FCM device token argv[3] with the plugin's set-device-info, reads it back with
// its get-device-info, allocates a recipient key through keylist-update (an out-of-band
// invitation), shuts down (the phone goes to sleep) and prints one JSON line for the
// test: {"ready": true, "recipientKey", "routingKeys", "deviceInfo", "ack"}.
// It then stays up until its standard input closes. argv[4] is a scratch directory for the
// askar wallet (a fresh temporary one if absent).
//
// The plugin was written for Credo 0.5 (peer dependency @credo-ts/core ^0.5.0). Against 0.6
// it breaks in two places, and the shim below (not a fork; node_modules untouched) bridges both:
//
// 1. Import. Its CommonJS build does `require("@credo-ts/core")` and uses DIDComm classes that
//    0.6 moved to @credo-ts/didcomm under new names: `class ... extends core_1.AgentMessage`
//    (build/fcm/messages/PushNotificationsFcmSetDeviceInfoMessage.js:21) throws
//    "TypeError: Class extends value undefined is not a constructor or null" at import.
//    Shim: a Module._load hook hands the plugin's files (and only them) @credo-ts/core's
//    exports plus the 0.5 names mapped to their 0.6 classes (CORE_05_NAMES).
// 2. Module registration. Credo 0.6 calls `module.register(dependencyManager)` with no feature
//    registry, and its DependencyManager has no `registerMessageHandlers`; the plugin's
//    register (build/fcm/PushNotificationsFcmModule.js:19-29) calls both. Shim: a subclass
//    collects what the plugin registers there and hands it, in `initialize`, to 0.6's
//    DidCommFeatureRegistry and DidCommMessageHandlerRegistry (as 0.6's own modules do).
import { askar } from '@openwallet-foundation/askar-nodejs'
import { AskarModule } from '@credo-ts/askar'
import * as core from '@credo-ts/core'
import * as didcomm from '@credo-ts/didcomm'
import { agentDependencies } from '@credo-ts/node'
import Module, { createRequire } from 'node:module'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

const { Agent, ConsoleLogger, LogLevel } = core
const {
  DidCommEventTypes,
  DidCommFeatureRegistry,
  DidCommHttpOutboundTransport,
  DidCommMediatorPickupStrategy,
  DidCommMessageHandlerRegistry,
  DidCommModule,
  DidCommWsOutboundTransport,
} = didcomm

// ---- shim 1: the plugin's view of @credo-ts/core (0.5 names -> 0.6 classes)
const CORE_05_NAMES = {
  AgentMessage: didcomm.DidCommMessage,
  ProblemReportMessage: didcomm.DidCommProblemReportMessage,
  ProblemReportError: didcomm.DidCommProblemReportError,
  Protocol: didcomm.DidCommProtocol,
  OutboundMessageContext: didcomm.DidCommOutboundMessageContext,
  MessageSender: didcomm.DidCommMessageSender,
  ConnectionService: didcomm.DidCommConnectionService,
  IsValidMessageType: didcomm.IsValidMessageType,
  parseMessageType: didcomm.parseMessageType,
}
const coreFor05 = { ...core, ...CORE_05_NAMES }
const pluginDir = `${path.sep}@credo-ts${path.sep}push-notifications${path.sep}`
const load = Module._load
Module._load = function (request, parent, isMain) {
  if (request === '@credo-ts/core' && parent?.filename?.includes(pluginDir)) return coreFor05
  return load.call(this, request, parent, isMain)
}
const { PushNotificationsFcmModule } = createRequire(import.meta.url)('@credo-ts/push-notifications')
Module._load = load

// ---- shim 2: 0.5-style register(dependencyManager, featureRegistry) on Credo 0.6
class PushNotificationsFcmModule06 extends PushNotificationsFcmModule {
  register(dependencyManager) {
    const features = []
    const handlers = []
    const dm = Object.create(dependencyManager, {
      registerMessageHandlers: { value: (hs) => handlers.push(...hs) },
    })
    super.register(dm, { register: (...fs) => features.push(...fs) })
    this.collected = { features, handlers }
  }
  async initialize(agentContext) {
    agentContext.resolve(DidCommFeatureRegistry).register(...this.collected.features)
    agentContext.resolve(DidCommMessageHandlerRegistry).registerMessageHandlers(this.collected.handlers)
  }
}

const [invitationUrl, token, dirArg] = process.argv.slice(2)
if (!invitationUrl || !token) {
  console.error('usage: wallet.mjs MEDIATOR_INVITATION_URL FCM_TOKEN [DATA_DIR]')
  process.exit(64)
}
const dataDir = dirArg || fs.mkdtempSync(path.join(os.tmpdir(), 'credo06-push-'))
const level = LogLevel[(process.env.INTEROP_LOG || 'error').toLowerCase()]
const Base = agentDependencies.FileSystem
class FileSystemIn extends Base {
  constructor() {
    super({ baseDataPath: dataDir, baseCachePath: dataDir })
  }
}
const label = `credo06-push-${process.pid}`
const agent = new Agent({
  config: { logger: new ConsoleLogger(typeof level === 'number' ? level : LogLevel.error), allowInsecureHttpUrls: true },
  dependencies: { ...agentDependencies, FileSystem: FileSystemIn },
  modules: {
    askar: new AskarModule({
      askar,
      store: {
        id: label,
        key: `${label}-key`,
        keyDerivationMethod: 'kdf:argon2i:int',
        database: { type: 'sqlite', config: { path: `${dataDir}/wallet.sqlite` } },
      },
    }),
    didcomm: new DidCommModule({
      transports: { inbound: [], outbound: [new DidCommHttpOutboundTransport(), new DidCommWsOutboundTransport()] },
      connections: { autoAcceptConnections: true },
      mediator: false,
      mediationRecipient: {
        mediatorInvitationUrl: invitationUrl,
        mediatorPickupStrategy: DidCommMediatorPickupStrategy.PickUpV2LiveMode,
      },
      credentials: false,
      proofs: false,
    }),
    pushNotificationsFcm: new PushNotificationsFcmModule06(),
  },
})

const seen = {}
const waiters = []
agent.events.on(DidCommEventTypes.DidCommMessageProcessed, (e) => {
  const m = e.payload.message
  const name = m.type.split('/').pop()
  if (m.type.includes('/push-notifications-fcm/') || name === 'ack') {
    seen[name] = m.toJSON ? m.toJSON() : m
    waiters.forEach((w) => w())
  }
})
const until = (name, ms) =>
  new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${name} within ${ms} ms: ${JSON.stringify(seen)}`)), ms)
    const check = () => seen[name] && (clearTimeout(t), resolve(seen[name]))
    waiters.push(check)
    check()
  })

try {
  await agent.initialize()
  const mediator = await agent.didcomm.mediationRecipient.findDefaultMediator()
  if (!mediator) throw new Error('no default mediator after initialize')
  const connectionId = mediator.connectionId
  await agent.modules.pushNotificationsFcm.setDeviceInfo(connectionId, { deviceToken: token, devicePlatform: 'android' })
  await agent.modules.pushNotificationsFcm.getDeviceInfo(connectionId)
  const deviceInfo = await until('device-info', 20000)
  const oob = await agent.didcomm.oob.createInvitation()
  const service = oob.outOfBandInvitation.getInlineServices()[0]
  // The phone goes to sleep: shutting the agent down closes its WebSocket to mailroom (0.6's
  // stopMessagePickup alone leaves the live session open, so mailroom delivers instead of
  // pushing).
  await agent.shutdown()
  console.log(
    JSON.stringify({
      ready: true,
      recipientKey: service.recipientKeys[0],
      routingKeys: service.routingKeys,
      deviceInfo,
      ack: seen.ack || null,
    })
  )
} catch (e) {
  console.error(`wallet failed: ${e?.stack ?? e}`)
  process.exit(1)
}
process.stdin.resume()
process.stdin.on('end', () => process.exit(0))
