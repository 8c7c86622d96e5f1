// A Credo 0.5.13 wallet with @credo-ts/push-notifications 0.7.1 (the plugin BC Wallet and
// Bifold run), mediated by mailroom: it takes mediation from the invitation in argv[2],
// registers the FCM device token argv[3] with set-device-info, reads it back with
// get-device-info, allocates a recipient key through keylist-update (an out-of-band
// invitation), stops picking up (the phone goes to sleep) and prints one JSON line for the
// test: {"ready": true, "recipientKey", "routingKeys", "deviceInfo", "ack"}.
// It then stays up until its standard input closes.
// @hyperledger/aries-askar-nodejs 0.2 needs the askar 0.3 library, which only GitHub releases
// ship (not reachable here; not on crates.io). Its successor binds askar 0.4 (built from
// crates.io) with the same API, and Credo 0.5's AskarModule takes it.
import { askarNodeJS as ariesAskar } from '@openwallet-foundation/askar-nodejs'
import { registerAriesAskar } from '@hyperledger/aries-askar-shared'
import { AskarModule } from '@credo-ts/askar'
import {
  Agent,
  AgentEventTypes,
  ConsoleLogger,
  HttpOutboundTransport,
  KeyDerivationMethod,
  LogLevel,
  MediationRecipientModule,
  MediatorPickupStrategy,
  WsOutboundTransport,
} from '@credo-ts/core'
import { agentDependencies } from '@credo-ts/node'
import { PushNotificationsFcmModule } from '@credo-ts/push-notifications'

registerAriesAskar({ askar: ariesAskar })

const [invitationUrl, token] = process.argv.slice(2)
const level = LogLevel[(process.env.INTEROP_LOG || 'error').toLowerCase()]
const agent = new Agent({
  config: {
    label: 'credo05-push-wallet',
    walletConfig: { id: `credo05-push-${process.pid}-${Date.now()}`, key: 'interop-key', keyDerivationMethod: KeyDerivationMethod.Argon2IInt },
    logger: new ConsoleLogger(typeof level === 'number' ? level : LogLevel.error),
    allowInsecureHttpUrls: true,
  },
  dependencies: agentDependencies,
  modules: {
    askar: new AskarModule({ ariesAskar }),
    mediationRecipient: new MediationRecipientModule({
      mediatorInvitationUrl: invitationUrl,
      mediatorPickupStrategy: MediatorPickupStrategy.PickUpV2,
    }),
    pushNotificationsFcm: new PushNotificationsFcmModule(),
  },
})
agent.registerOutboundTransport(new HttpOutboundTransport())
agent.registerOutboundTransport(new WsOutboundTransport())

const seen = {}
const waiters = []
agent.events.on(AgentEventTypes.AgentMessageProcessed, (e) => {
  const m = e.payload.message
  const name = m.type.split('/').pop()
  if (m.type.includes('/push-notifications-fcm/')) {
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

// Credo 0.5 recognises "not found" only as its own askar wrapper's error class: create the
// wallet explicitly, then initialize opens the open wallet as is.
await agent.wallet.createAndOpen(agent.config.walletConfig)
await agent.initialize()
const mediator = await agent.mediationRecipient.findDefaultMediator()
if (!mediator) throw new Error('no default mediator after initialize')
const connectionId = mediator.connectionId
await agent.modules.pushNotificationsFcm.setDeviceInfo(connectionId, { deviceToken: token, devicePlatform: 'android' })
await agent.modules.pushNotificationsFcm.getDeviceInfo(connectionId)
const deviceInfo = await until('device-info', 20000)
const oob = await agent.oob.createInvitation()
const service = oob.outOfBandInvitation.getInlineServices()[0]
await agent.mediationRecipient.stopMessagePickup()
console.log(
  JSON.stringify({
    ready: true,
    recipientKey: service.recipientKeys[0],
    routingKeys: service.routingKeys,
    deviceInfo,
    ack: seen.ack || null,
  })
)
process.stdin.resume()
process.stdin.on('end', async () => {
  await agent.shutdown()
  process.exit(0)
})
