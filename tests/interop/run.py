#!/usr/bin/env python3
"""Interop scenarios: real Credo 0.6.3 and ACA-Py 1.7.0 agents using a DIDComm v1 mediator.

The mediator is given as input, so the same scenarios run against mailroom, Credo's own
mediator or ACA-Py's:

    run.py --mediator-url http://127.0.0.1:P        (GET /invitation -> {"invitation_url", ...})
    run.py --invitation-url 'http://...?oob=...'   (an OOB invitation, taken as is)
    [--admin-url http://127.0.0.1:A  (waits for GET /ready first)]
    [--acapy-bin PATH] [--scenarios s1,s3-acapy] [--count 20] [--offline-count 100]

Each scenario prints one `PASS name (Ns): reason` or `FAIL name (Ns): reason` line; the last
line is `N passed, N failed` and the exit code is 1 if any failed. Every agent is a process
bound to 127.0.0.1 with its wallet in a temporary directory, started and ended by PID here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import sys
import signal
import tempfile
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import AcaPy, CredoAgent, StepError, http_json, wait_until  # noqa: E402

ACKED = ("PickUpV2LiveMode", "PickUpV2")  # strategies that acknowledge (messages-received)
SETTLE_S = 2.0  # after the last expected message: how long we keep counting late duplicates


def log(msg: str):
    if os.environ.get("INTEROP_VERBOSE") == "1":
        print(f"  .. {msg}", flush=True)


@contextlib.contextmanager
def step(what: str):
    """Names the step in a failure: 'mediatee creates its invitation: <error>'."""
    try:
        yield
    except StepError as e:
        raise StepError(f"{what}: {e}") from e


def decode_invitation(url: str) -> dict:
    """The invitation JSON carried in an `oob=` (or legacy `c_i=`) URL parameter."""
    q = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    for key in ("oob", "c_i", "d_m"):
        if key in q:
            raw = q[key][0]
            return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    raise StepError(f"no oob/c_i parameter in invitation URL {url[:120]}")


class Ctx:
    def __init__(self, args, invitation_url: str, invitation: dict, root: Path):
        self.args = args
        self.invitation_url = invitation_url
        self.invitation = invitation
        self.root = root
        self.count = args.count
        self.acapy_bin = args.acapy_bin
        self._cleanup = []
        self.owned = []
        self.timed_out = False
        self._lock = threading.Lock()

    def start_watchdog(self, seconds: float):
        """Bounds the scenario: after `seconds` every process of it is ended, so whatever step
        is waiting fails at once (and the FAIL line says the scenario ran out of time)."""
        def fire():
            self.timed_out = True
            self.close_all()
        self._watchdog = threading.Timer(seconds, fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def workdir(self, name: str) -> Path:
        """A new directory per scenario run (a repeat never reuses a wallet)."""
        d, i = self.root / name, 1
        while d.exists():
            i += 1
            d = self.root / f"{name}-{i}"
        d.mkdir(parents=True)
        return d

    def own(self, thing):
        """Registers a process wrapper to be closed when the scenario ends."""
        with self._lock:
            self._cleanup.append(thing)
            self.owned.append(thing)
        if self.timed_out:
            self.close_all()
        return thing

    def close_all(self):
        if getattr(self, "_watchdog", None) and threading.current_thread() is not self._watchdog:
            self._watchdog.cancel()
        while True:
            with self._lock:
                if not self._cleanup:
                    return
                t = self._cleanup.pop()
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                print(f"  (cleanup of {getattr(t, 'name', t)} failed: {e})", flush=True)

    def mediatee(self, wd: Path, name: str, pickup: str) -> CredoAgent:
        return self.own(CredoAgent(name, wd, "mediatee", mediator_invitation=self.invitation_url,
                                   pickup=pickup, polling_ms=self.args.polling_ms))

    def sender(self, wd: Path, name: str = "credo-sender") -> CredoAgent:
        return self.own(CredoAgent(name, wd, "sender"))

    def acapy(self, wd: Path, name: str, extra=None) -> AcaPy:
        if not self.acapy_bin:
            raise StepError("ACA-Py is not installed: scripts/interop-setup.sh found no Python 3.13/3.12 "
                            "(set INTEROP_PYTHON, or ACAPY_BIN / --acapy-bin)")
        return self.own(AcaPy(name, wd, self.acapy_bin, extra_args=extra))


def connect_credo_sender_to_mediatee(sender: CredoAgent, mediatee: CredoAgent) -> tuple[str, float]:
    """The mediatee invites (its DIDs route through the mediator), the sender accepts.
    Returns the sender's connection id and the seconds it took until both sides completed."""
    t0 = time.monotonic()
    with step("mediatee creates an invitation routed through the mediator (keylist-update)"):
        inv = mediatee.create_invitation()
    svc = (inv["invitation"].get("services") or [{}])[0]
    if isinstance(svc, dict) and not svc.get("routingKeys"):
        raise StepError(f"mediatee invitation has no routingKeys (not routed through the mediator): {svc}")
    with step("sender connects to the mediatee through the mediator (DID exchange)"):
        conn = sender.receive_invitation(inv["invitationUrl"], timeout=30)
    with step("mediatee completes the DID exchange"):
        mediatee.wait_connection(inv["outOfBandId"], timeout=30)
    return conn, time.monotonic() - t0


def check_received(got: dict, expected: int, acked: bool, what: str) -> str:
    dup = got["duplicates"]
    if got["unique"] < expected:
        raise StepError(f"{what}: received {got['unique']}/{expected} distinct messages "
                        f"({got['total']} deliveries, {dup} duplicates)")
    if acked and dup:
        raise StepError(f"{what}: all {expected} received but {dup} duplicate deliveries "
                        f"on an acknowledged strategy")
    return f"{got['unique']}/{expected} received, {dup} duplicates"


# ---------------------------------------------------------------------------- scenario 1
def scenario_pickup(ctx: Ctx, strategy: str) -> str:
    wd = ctx.workdir(f"s1-{strategy}")
    mediatee = ctx.mediatee(wd, f"mediatee-{strategy}", strategy)
    sender = ctx.sender(wd)
    with step("sender starts"):
        sender.wait_ready()
    with step("mediatee starts (connects to the mediator, mediation granted)"):
        mediatee.wait_ready()
    log(f"agents ready: sender {sender.ready_s:.1f}s, mediatee (mediation granted) {mediatee.ready_s:.1f}s")
    conn, conn_s = connect_credo_sender_to_mediatee(sender, mediatee)
    log(f"connected in {conn_s:.1f}s")
    prefix = f"s1-{strategy}"
    t0 = time.monotonic()
    sent = sender.send(conn, ctx.count, prefix)
    if sent["failed"]:
        raise StepError(f"sender could not send {sent['failed']}/{ctx.count}: {sent['errors']}")
    got = mediatee.wait_received(prefix, ctx.count, timeout=60)
    deliver_s = time.monotonic() - t0
    if got["unique"] >= ctx.count:
        time.sleep(SETTLE_S)  # not synchronisation: a window in which late duplicates would show
        got = mediatee.received(prefix)
    reason = check_received(got, ctx.count, strategy in ACKED, strategy)
    return f"{reason}; sent in {sent['ms'] / 1000:.1f}s, all delivered after {deliver_s:.1f}s"


# ---------------------------------------------------------------------------- scenario 2
def scenario_offline(ctx: Ctx) -> str:
    n = ctx.args.offline_count
    wd = ctx.workdir("s2-offline")
    mediatee = ctx.mediatee(wd, "mediatee-offline", "PickUpV2LiveMode")
    sender = ctx.sender(wd)
    with step("sender starts"):
        sender.wait_ready()
    with step("mediatee starts (connects to the mediator, mediation granted)"):
        mediatee.wait_ready()
    conn, _ = connect_credo_sender_to_mediatee(sender, mediatee)
    # Online first: one message proves the live path before the mediatee goes away.
    sender.send(conn, 1, "s2-warmup")
    warm = mediatee.wait_received("s2-warmup", 1, timeout=20)
    if warm["unique"] < 1:
        raise StepError("mediatee did not receive the warm-up message while online")
    with step("mediatee shuts its agent down"):
        mediatee.stop_agent()
    log("mediatee offline (agent shut down, wallet kept)")
    prefix = "s2-offline"
    sent = sender.send(conn, n, prefix, timeout=90)
    if sent["failed"]:
        raise StepError(f"sender could not send {sent['failed']}/{n} while the mediatee was offline: {sent['errors']}")
    early = mediatee.received(prefix)
    if early["total"]:
        raise StepError(f"mediatee got {early['total']} messages while its agent was shut down")
    t0 = time.monotonic()
    with step("mediatee restarts on the same wallet"):
        started = mediatee.start_agent()
    log(f"mediatee back online in {started.get('ms', 0) / 1000:.1f}s")
    got = mediatee.wait_received(prefix, n, timeout=90)
    deliver_s = time.monotonic() - t0
    if got["unique"] >= n:
        time.sleep(SETTLE_S)
        got = mediatee.received(prefix)
    reason = check_received(got, n, True, "after reconnect")
    return f"{reason}; {n} queued in {sent['ms'] / 1000:.1f}s, drained {deliver_s:.1f}s after restart"


# ---------------------------------------------------------------------------- scenario 3
def scenario_acapy_sender(ctx: Ctx) -> str:
    wd = ctx.workdir("s3-acapy-sender")
    mediatee = ctx.mediatee(wd, "mediatee-acapy", "PickUpV2LiveMode")
    aca = ctx.acapy(wd, "acapy-sender")
    with step("mediatee starts (connects to the mediator, mediation granted)"):
        mediatee.wait_ready()
    with step("ACA-Py starts"):
        aca.wait_ready()
    log(f"acapy ready in {aca.ready_s:.1f}s")
    inviter = ctx.args.s3_inviter
    t0 = time.monotonic()
    if inviter == "mediatee":
        # The mediatee invites; ACA-Py is the DID-exchange requester.
        inv = mediatee.create_invitation()
        oob = aca.receive_invitation(inv["invitation"])
        aca_conn = oob.get("connection_id")
        if not aca_conn:
            raise StepError(f"ACA-Py made no connection from the mediatee's invitation: {json.dumps(oob)[:300]}")
        try:
            aca.wait_active(aca_conn, timeout=30)
        except StepError as e:
            raise StepError(f"ACA-Py <- Credo mediatee DID exchange did not complete: {e}") from e
        mediatee.wait_connection(inv["outOfBandId"], timeout=30)
    else:
        # ACA-Py invites; the mediatee (requester) publishes a DID that routes through the mediator.
        inv = aca.create_invitation()
        with step("mediatee accepts ACA-Py's invitation (DID exchange, its DID routed through the mediator)"):
            mediatee.receive_invitation(inv["invitation_url"], timeout=30)
        with step("ACA-Py completes the DID exchange"):
            aca_conn = aca.wait_connection_for_invitation(inv["invi_msg_id"], timeout=30)["connection_id"]
    log(f"connected ({inviter} invited) in {time.monotonic() - t0:.1f}s")
    prefix = "s3-acapy"
    t0 = time.monotonic()
    for i in range(ctx.count):
        aca.send_message(aca_conn, f"{prefix}-{i:04d}")
    send_s = time.monotonic() - t0
    got = mediatee.wait_received(prefix, ctx.count, timeout=60)
    deliver_s = time.monotonic() - t0
    if got["unique"] >= ctx.count:
        time.sleep(SETTLE_S)
        got = mediatee.received(prefix)
    reason = check_received(got, ctx.count, True, "from ACA-Py")
    return f"{reason}; {inviter} invited; sent in {send_s:.1f}s, all delivered after {deliver_s:.1f}s"


# ---------------------------------------------------------------------------- scenario 4
def scenario_acapy_mediatee(ctx: Ctx) -> str:
    wd = ctx.workdir("s4-acapy-mediatee")
    aca = ctx.acapy(wd, "acapy-mediatee")
    sender = ctx.sender(wd)
    with step("ACA-Py starts"):
        aca.wait_ready()
    with step("sender starts"):
        sender.wait_ready()
    t0 = time.monotonic()
    invitation, note = acapy_compatible(ctx.invitation, ctx.args.mediator_name)
    with step("ACA-Py receives the mediator's invitation"):
        oob = aca.receive_invitation(invitation)
    med_conn = oob.get("connection_id")
    if not med_conn:
        raise StepError(f"ACA-Py made no connection from the mediator's invitation: {json.dumps(oob)[:300]}")
    try:
        aca.wait_active(med_conn, timeout=30)
    except StepError as e:
        raise StepError(f"ACA-Py -> mediator DID exchange did not complete: {e}") from e
    log(f"acapy connected to the mediator in {time.monotonic() - t0:.1f}s")
    req = aca.call("POST", f"/mediation/request/{med_conn}", {})
    mediation_id = req["mediation_id"]

    def granted():
        r = aca.call("GET", f"/mediation/requests/{mediation_id}")
        if r.get("state") == "denied":
            raise StepError(f"mediation denied: {r}")
        return r if r.get("state") == "granted" else None
    try:
        grant = wait_until(granted, 30, "mediation granted")
    except StepError as e:
        raise StepError(f"ACA-Py mediation request: {e}; log: {aca.proc.logs(8)}") from e
    aca.call("PUT", f"/mediation/{mediation_id}/default-mediator", {})
    log(f"mediation granted: routing keys {grant.get('routing_keys')}")
    inv = aca.create_invitation(mediation_id=mediation_id)
    svc = (inv["invitation"].get("services") or [{}])[0]
    if isinstance(svc, dict) and not svc.get("routingKeys"):
        raise StepError(f"ACA-Py's invitation does not route through the mediator: {svc}")
    with step("sender connects to ACA-Py through the mediator (DID exchange)"):
        sender.receive_invitation(inv["invitation_url"], timeout=30)
    conn = [c for c in sender.status()["connections"] if c["theirLabel"] == "acapy-mediatee"]
    with step("ACA-Py completes the DID exchange"):
        aca.wait_connection_for_invitation(inv["invi_msg_id"], timeout=30)
    if not conn:
        raise StepError("sender has no connection to ACA-Py")
    prefix = "s4-to-acapy"
    t0 = time.monotonic()
    sent = sender.send(conn[0]["id"], ctx.count, prefix)
    if sent["failed"]:
        raise StepError(f"sender could not send {sent['failed']}/{ctx.count}: {sent['errors']}")
    try:
        wait_until(lambda: aca.basic_messages(prefix)[0] >= ctx.count, 60, f"{ctx.count} basicmessages webhooks",
                   every=0.1)
    except StepError:
        pass
    deliver_s = time.monotonic() - t0
    unique, dups = aca.basic_messages(prefix)
    if unique >= ctx.count:
        time.sleep(SETTLE_S)
        unique, dups = aca.basic_messages(prefix)
    reason = check_received({"unique": unique, "duplicates": dups, "total": unique + dups}, ctx.count, False,
                            "at ACA-Py")
    return f"{reason}; all delivered after {deliver_s:.1f}s{note}"


def acapy_compatible(invitation: dict, mediator: str) -> tuple[dict, str]:
    """ACA-Py 1.7's receive-invitation refuses an invitation whose `services` has more than one
    element ('service array must have exactly one element'). mailroom's invitation has one
    service, so ACA-Py gets it exactly as `mailroom run` prints it: a second service there is a
    failure, not something to trim. Other mediators advertising http and ws (Credo's) are
    trimmed to their http service for ACA-Py; their DID documents still carry both."""
    services = invitation.get("services") or []
    if len(services) <= 1:
        return invitation, ""
    if mediator == "mailroom":
        raise StepError(f"mailroom's invitation has {len(services)} services: ACA-Py 1.7 refuses more than one")
    http_svc = [s for s in services if isinstance(s, dict) and str(s.get("serviceEndpoint", "")).startswith("http")]
    trimmed = dict(invitation, services=(http_svc or services)[:1])
    return trimmed, f" (note: invitation trimmed from {len(services)} services to 1 for ACA-Py)"


# ---------------------------------------------------------------------------- scenario 6
def scenario_drain(ctx: Ctx) -> str:
    """A cluster node is drained (admin POST /drain) under a live-mode Credo wallet: its socket
    is closed with 1001, the wallet reconnects through the load balancer to another node, and
    every message sent after the drain is delivered. Needs --node-admin-urls."""
    admins = [u.strip().rstrip("/") for u in (ctx.args.node_admin_urls or "").split(",") if u.strip()]
    if len(admins) < 2:
        raise StepError("s6-drain needs --node-admin-urls with at least two nodes' admin URLs")

    def holders() -> list[str]:
        return [u for u in admins if http_json("GET", u + "/sessions", timeout=5).get("sessions")]

    wd = ctx.workdir("s6-drain")
    mediatee = ctx.mediatee(wd, "mediatee-drain", "PickUpV2LiveMode")
    sender = ctx.sender(wd)
    with step("sender starts"):
        sender.wait_ready()
    with step("mediatee starts (connects to the mediator, mediation granted)"):
        mediatee.wait_ready()
    conn, _ = connect_credo_sender_to_mediatee(sender, mediatee)
    sender.send(conn, 1, "s6-warmup")
    if mediatee.wait_received("s6-warmup", 1, timeout=20)["unique"] < 1:
        raise StepError("mediatee did not receive the warm-up message before the drain")
    with step("find the node holding the mediatee's live session"):
        drained = wait_until(lambda: (holders() or [None])[0], 20, "a node holding a session")
    drained_at = time.monotonic()
    try:
        with step(f"drain {drained}"):
            http_json("POST", drained + "/drain", {}, timeout=10)
        with step("the drained node reports not ready and empty"):
            r = http_json("GET", drained + "/ready", timeout=5, ok=range(100, 600))
            if r.get("ready") is not False:
                raise StepError(f"/ready of a drained node: {r}")
            wait_until(lambda: http_json("GET", drained + "/status", timeout=5)["drain"]["empty"], 30,
                       "the drained node to hold no session")
        with step("the wallet reconnects to another node"):
            moved = wait_until(lambda: [u for u in holders() if u != drained], 60,
                               "a session of the mediatee on another node")
        moved_s = time.monotonic() - drained_at
        prefix = "s6-drain"
        sent = sender.send(conn, ctx.count, prefix)
        if sent["failed"]:
            raise StepError(f"sender could not send {sent['failed']}/{ctx.count} after the drain: {sent['errors']}")
        got = mediatee.wait_received(prefix, ctx.count, timeout=60)
        if got["unique"] >= ctx.count:
            time.sleep(SETTLE_S)  # a window in which late duplicates would show
            got = mediatee.received(prefix)
        if drained in holders():
            raise StepError(f"the drained node {drained} holds a session again")
        reason = check_received(got, ctx.count, True, "after the drain")
        return f"{reason}; wallet moved from {drained} to {moved[0]} in {moved_s:.1f}s"
    finally:
        with contextlib.suppress(Exception):
            http_json("POST", drained + "/undrain", {}, timeout=10)


SCENARIOS = [
    ("s1-PickUpV2LiveMode", lambda c: scenario_pickup(c, "PickUpV2LiveMode")),
    ("s1-PickUpV2", lambda c: scenario_pickup(c, "PickUpV2")),
    ("s1-PickUpV1", lambda c: scenario_pickup(c, "PickUpV1")),
    ("s1-Implicit", lambda c: scenario_pickup(c, "Implicit")),
    ("s2-offline-100", scenario_offline),
    ("s3-acapy-sender", scenario_acapy_sender),
    ("s4-acapy-mediatee", scenario_acapy_mediatee),
    ("s6-drain", scenario_drain),
]

# DIDComm v2 peers (Veramo, Indicio's didcomm-messaging) on the mediator's v2 endpoint.
if os.environ.get("INTEROP_V2") == "1":
    sys.path.insert(0, str(Path(__file__).resolve().parent / "v2"))
    from scenarios import SCENARIOS as V2_SCENARIOS  # noqa: E402

    SCENARIOS = SCENARIOS + V2_SCENARIOS

    def scenario_v1_and_v2_live(ctx: Ctx) -> str:
        """A live DIDComm v1 wallet (Credo 0.6.3, pickup 2.0 live mode) and a live v2 wallet
        (Indicio's didcomm-messaging, live delivery on its socket) on the same mediator at the
        same time, each sent `count` messages at once: each gets all of its own, once, and
        nothing of the other's."""
        from scenarios import indicio_mediatee, indicio_sender, need_peers, v2_invitation
        need_peers(False, True)
        wd = ctx.workdir("v1-v2-live")
        mediatee = ctx.mediatee(wd, "mediatee-v1-live", "PickUpV2LiveMode")
        sender = ctx.sender(wd)
        v2_wallet = indicio_mediatee(ctx, wd, v2_invitation(ctx), "live")
        with step("v1 sender, v1 live wallet and v2 live wallet start"):
            sender.wait_ready()
            mediatee.wait_ready()
            ready = v2_wallet.wait_event("ready", 60)
        conn, _ = connect_credo_sender_to_mediatee(sender, mediatee)
        p1, p2 = "v1v2-v1", "v1v2-v2"
        t0 = time.monotonic()
        v2_sender = indicio_sender(ctx, wd, ready["did"], ctx.count, p2, anoncrypt=False)
        sent = sender.send(conn, ctx.count, p1)
        if sent["failed"]:
            raise StepError(f"v1 sender could not send {sent['failed']}/{ctx.count}: {sent['errors']}")
        code = v2_sender.wait_exit(120)
        done = next((e for e in v2_sender.events() if e.get("event") == "done"), {})
        if code != 0 or done.get("failed"):
            raise StepError(f"v2 sender: exit {code}, {done}: {v2_sender.proc.logs(12)}")
        mediatee.wait_received(p1, ctx.count, timeout=60)
        v2_wallet.wait_received(p2, ctx.count, 90)
        both_s = time.monotonic() - t0
        time.sleep(SETTLE_S)  # not synchronisation: a window in which late duplicates would show
        v1 = check_received(mediatee.received(p1), ctx.count, True, "v1 wallet")
        unique, dups = v2_wallet.received(p2)
        if unique < ctx.count or dups:
            raise StepError(f"v2 wallet: {unique}/{ctx.count} distinct, {dups} duplicates")
        if mediatee.received(p2)["total"] or v2_wallet.received(p1)[0]:
            raise StepError("a wallet received the other one's messages")
        return f"v1 {v1}; v2 {unique}/{ctx.count} once; both delivered after {both_s:.1f}s"

    SCENARIOS = SCENARIOS + [("v1-v2-live", scenario_v1_and_v2_live)]


def known_limit(mediator: str, strategy: str, name: str) -> str | None:
    """Why a mediator cannot pass a scenario (then it is skipped, not failed): the reference
    mediators' known gaps, and what a delivery strategy rules out by definition. mailroom has no
    entry of its own: under its default strategy every scenario runs."""
    if (name.startswith("v2-") or name == "v1-v2-live") and mediator in ("credo", "acapy"):
        return f"{mediator} is a DIDComm v1 mediator (no v2 endpoint)"
    if mediator == "credo":
        if name == "s4-acapy-mediatee":
            return ("Credo 0.6.3's DID-exchange responder omits ~thread.pthid, so ACA-Py 1.7 cannot connect to it "
                    "('DIDXComplete schema validation failed'); validated with INTEROP_MEDIATOR=acapy")
        if name == "s1-Implicit" and strategy != "DirectDelivery":
            return ("Credo 0.6.3's mediator pushes to an implicit (return-route) socket only under DirectDelivery; "
                    "run with INTEROP_STRATEGY=DirectDelivery")
    if strategy == "QueueOnly" and name == "s1-Implicit":
        return "QueueOnly never pushes, and implicit pickup only receives what is pushed"
    if mediator == "acapy" and name != "s1-Implicit" and name != "s4-acapy-mediatee":
        return "ACA-Py 1.7 has no pickup protocol (implicit return-route only)"
    return None


def on_termination_signal(signum, _frame):
    if harness.spawning():
        harness.hold_signal(signum)  # re-raised as soon as the new child is registered
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    ended = harness.end_all()
    print(f"interop: {signal.Signals(signum).name}: ended {len(ended)} agent processes"
          + (f" ({', '.join(ended)})" if ended else ""), flush=True)
    sys.exit(128 + signum)


def run_scenario(args, invitation_url: str, invitation: dict, root: Path, fn) -> tuple[bool, str, list[str]]:
    """Runs one scenario in a Ctx of its own: (passed, reason, the peers that died of a signal this
    harness did not send, read before the scenario's processes are ended)."""
    ctx = Ctx(args, invitation_url, invitation, root)
    ctx.start_watchdog(args.scenario_timeout)
    crashes: list[str] = []
    try:
        reason = fn(ctx)
        ok = not ctx.timed_out
        if ctx.timed_out:
            reason = f"scenario exceeded {args.scenario_timeout:.0f}s"
    except StepError as e:
        reason, ok = str(e), False
        if ctx.timed_out:
            reason = f"scenario exceeded {args.scenario_timeout:.0f}s (its agents were ended); then: {reason}"
    except Exception as e:  # noqa: BLE001 - a harness bug is a FAIL with its trace, not a crash
        reason, ok = f"harness error {type(e).__name__}: {e}\n{traceback.format_exc()}", False
    finally:
        if not ctx.timed_out:
            crashes = [c for t in list(ctx.owned) if (p := getattr(t, "proc", None)) and (c := p.crash())]
        ctx.close_all()
    if not ok:
        said = []
        for t in ctx.owned:
            if isinstance(t, CredoAgent):
                errs = t.proc.credo_errors()
                if errs:
                    said.append(f"{t.name} logged: " + " | ".join(errs))
        if said:
            reason += "\n    " + "\n    ".join(said)
    return ok, reason, crashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--mediator-url", help="public URL serving GET /invitation")
    src.add_argument("--invitation-url", help="the mediator's out-of-band invitation URL")
    ap.add_argument("--admin-url", help="admin URL; GET /ready must answer 200 first")
    ap.add_argument("--ready-path", default="/ready")
    ap.add_argument("--node-admin-urls", default=os.environ.get("INTEROP_NODE_ADMIN_URLS", ""),
                    help="comma-separated admin URLs of every cluster node (s6-drain drains one of them)")
    ap.add_argument("--acapy-bin", default=os.environ.get("ACAPY_BIN"))
    ap.add_argument("--scenarios", default=os.environ.get("INTEROP_SCENARIOS", ""),
                    help="comma-separated name prefixes (default: all)")
    ap.add_argument("--repeat", type=int, default=int(os.environ.get("INTEROP_REPEAT", "1")),
                    help="run the selected scenarios this many times (to catch intermittent races)")
    ap.add_argument("--count", type=int, default=int(os.environ.get("INTEROP_COUNT", "20")))
    ap.add_argument("--offline-count", type=int, default=int(os.environ.get("INTEROP_OFFLINE_COUNT", "100")))
    ap.add_argument("--polling-ms", type=int, default=1000, help="mediatee polling interval (PickUpV2, PickUpV1)")
    ap.add_argument("--s3-inviter", choices=("mediatee", "acapy"), default=os.environ.get("INTEROP_S3_INVITER", "acapy"),
                    help="who invites in s3: ACA-Py 1.7 cannot complete a DID exchange that Credo 0.6.3 answers "
                         "(its response has no pthid: 'DIDXComplete schema validation failed'), so ACA-Py invites")
    ap.add_argument("--work", help="work directory (default: a new temp dir, removed unless INTEROP_KEEP=1)")
    ap.add_argument("--mediator-name", default=os.environ.get("INTEROP_MEDIATOR", "mediator"))
    ap.add_argument("--strategy", default=os.environ.get("INTEROP_STRATEGY", "QueueAndLiveModeDelivery"),
                    help="the mediator's delivery strategy (only used to know a reference mediator's limits)")
    ap.add_argument("--no-skip", action="store_true", default=os.environ.get("INTEROP_NO_SKIP") == "1",
                    help="run scenarios a reference mediator is known not to pass")
    ap.add_argument("--scenario-timeout", type=float, default=float(os.environ.get("INTEROP_SCENARIO_TIMEOUT", "120")))
    ap.add_argument("--summary-file", help="also write 'PASSED FAILED' here (the caller prints the closing line)")
    ap.add_argument("--no-summary", action="store_true", help="do not print the closing 'N passed, N failed' line")
    args = ap.parse_args()
    # SIGTERM/SIGINT/SIGHUP: every agent process this run started is ended here, at once (by
    # PID: SIGTERM, then SIGKILL after a few seconds), whatever the scenario was doing; a
    # scenario's own cleanup can be the very thing the signal interrupts. Then exit 128+N.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_termination_signal)

    if args.admin_url:
        wait_until(lambda: http_json("GET", args.admin_url.rstrip("/") + args.ready_path, timeout=2) is not None,
                   60, f"{args.admin_url}{args.ready_path}")
    if args.mediator_url:
        body = http_json("GET", args.mediator_url.rstrip("/") + "/invitation", timeout=10)
        invitation_url = body.get("invitation_url")
        invitation = body.get("invitation")
        if not invitation_url:
            print(f"FAIL setup: GET /invitation gave no invitation_url: {json.dumps(body)[:300]}")
            if args.summary_file:
                Path(args.summary_file).write_text("0 1\n")
            if not args.no_summary:
                print("0 passed, 1 failed")
            return 1
        if not invitation:
            invitation = decode_invitation(invitation_url)
    else:
        invitation_url = args.invitation_url
        invitation = decode_invitation(invitation_url)

    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    names = {n for n, _ in SCENARIOS}

    def matches(n: str, w: str) -> bool:
        # A full scenario name selects only that scenario; anything else is a name prefix.
        return n == w or (w not in names and n.startswith(w))

    # Scenarios that need several nodes run by default only when the nodes are given
    # (interop-cluster.sh); asked for by name without them, they fail with the reason.
    cluster_only = {"s6-drain"}

    def selected(n: str) -> bool:
        if not wanted:
            return n not in cluster_only or bool(args.node_admin_urls)
        return any(matches(n, w) for w in wanted)
    chosen = [(n, f) for n, f in SCENARIOS if selected(n)] * max(1, args.repeat)
    # Asked for something that does not exist: a failure, not "0 passed, 0 failed".
    unmatched = [w for w in wanted if not any(matches(n, w) for n in names)]
    if unmatched or not chosen or args.repeat < 1:
        why = (f"--scenarios/INTEROP_SCENARIOS entries match no scenario: {', '.join(unmatched)}" if unmatched
               else f"no scenario selected (--repeat {args.repeat})")
        print(f"FAIL setup: {why}; known: {', '.join(n for n, _ in SCENARIOS)}", flush=True)
        if args.summary_file:
            Path(args.summary_file).write_text("0 1\n")
        if not args.no_summary:
            print("0 passed, 1 failed", flush=True)
        return 1
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mailroom-interop-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"interop: {len(chosen)} scenarios against {args.mediator_name} ({invitation_url[:60]}...), work dir {root}",
          flush=True)
    passed = failed = skipped = 0
    for name, fn in chosen:
        why = None if args.no_skip else known_limit(args.mediator_name, args.strategy, name)
        if why:
            skipped += 1
            print(f"SKIP {name}: {why}", flush=True)
            continue
        t0 = time.monotonic()
        ok, reason, crashes = run_scenario(args, invitation_url, invitation, root, fn)
        if not ok and crashes:
            # A peer killed by a signal it was not sent (a segfault in its native wallet code, the
            # OOM killer) failed the run, not the mediator: said, and run once more. A second
            # failure of any kind counts.
            print(f"RERUN {name}: {'; '.join(crashes)} (a crash of the peer process); first run: "
                  f"{(reason.splitlines() or [''])[0][:300]}", flush=True)
            ok, reason, again = run_scenario(args, invitation_url, invitation, root, fn)
            reason += f" (second run; the first ended when {'; '.join(crashes)}"
            reason += f"; in this one {'; '.join(again)})" if again else ")"
        dt = time.monotonic() - t0
        if ok:
            passed += 1
        else:
            failed += 1
        print(f"{'PASS' if ok else 'FAIL'} {name} ({dt:.1f}s): {reason}", flush=True)
    # Every chosen scenario ran (or was skipped for a stated reason), and at least one ran.
    ran = passed + failed
    if ran + skipped != len(chosen) or ran == 0:
        print(f"FAIL run: {ran} scenarios ran and {skipped} were skipped, of {len(chosen)} asked for",
              flush=True)
        failed += 1
    if not args.work and os.environ.get("INTEROP_KEEP") != "1" and failed == 0:
        shutil.rmtree(root, ignore_errors=True)
    elif failed:
        print(f"interop: logs kept in {root}", flush=True)
    if args.summary_file:
        Path(args.summary_file).write_text(f"{passed} {failed} {skipped}\n")
    if not args.no_summary:
        print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
