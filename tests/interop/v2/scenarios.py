"""DIDComm v2 interop scenarios (INTEROP_V2=1): real Veramo 7.0.1 and Indicio didcomm-messaging
0.1.1 peers (installed by `scripts/interop-setup.sh v2`) using the mediator's v2 endpoint
(`GET /invitation?didcomm=v2`). Imported by tests/interop/run.py; each scenario takes its Ctx.

- v2-veramo: a Veramo mediatee (coordinate-mediation 3.0, pickup 3.0 polled over HTTP) and a
  Veramo sender (routing 2.0 through the mediator, authcrypt A256GCM as Veramo defaults to).
- v2-indicio-live: an Indicio mediatee in pickup 3.0 live mode over a WebSocket and an Indicio
  sender (authcrypt A256CBC-HS512, draft-04, forward anoncrypted XC20P).
- v2-indicio-poll: the same Indicio wallet polling pickup 3.0 over HTTP (return_route all).
- v2-indicio-to-veramo: an Indicio sender (anoncrypt: Veramo cannot open Indicio's authcrypt)
  to a Veramo mediatee: both dialects through one mediator.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from harness import Proc, StepError, http_json

HERE = Path(__file__).resolve().parent
VERAMO_DIR = Path(os.environ.get("VERAMO_DIR") or HERE / "veramo")
INDICIO_PYTHON = os.environ.get("INDICIO_PYTHON", "")


class Peer:
    """A driver process printing JSON lines; close() ends its PID."""

    def __init__(self, name: str, argv: list[str], wd: Path, cwd: Path | None = None):
        self.name = name
        self.proc = Proc(name, argv, wd, cwd=str(cwd) if cwd else None)

    def events(self) -> list[dict]:
        out = []
        for line in self.proc.out.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e.get("event") == name:
                    return e
                if e.get("event") == "error" and name == "ready":
                    raise StepError(f"{self.name}: {e}")
            if not self.proc.alive():
                raise StepError(f"{self.name} {self.proc.exit_text()} before '{name}': {self.proc.logs(12)}")
            if time.monotonic() > deadline:
                raise StepError(f"{self.name}: no '{name}' after {timeout:.0f}s: {self.proc.logs(12)}")
            time.sleep(0.1)

    def received(self, prefix: str) -> tuple[int, int]:
        """(unique, duplicates) among received messages whose content starts with prefix."""
        ids: dict[str, int] = {}
        for e in self.events():
            if e.get("event") == "received" and str(e.get("content") or "").startswith(prefix):
                ids[e["id"]] = ids.get(e["id"], 0) + 1
        return len(ids), sum(n - 1 for n in ids.values())

    def wait_received(self, prefix: str, want: int, timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(prefix)
            if got[0] >= want:
                return got
            if time.monotonic() > deadline:
                raise StepError(f"{self.name}: {got[0]}/{want} received after {timeout:.0f}s: {self.proc.logs(12)}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.alive():
            if time.monotonic() > deadline:
                raise StepError(f"{self.name} still running after {timeout:.0f}s: {self.proc.logs(12)}")
            time.sleep(0.1)
        return self.proc.popen.returncode

    def close(self):
        self.proc.stop()


def v2_invitation(ctx) -> str:
    base = ctx.args.mediator_url
    if not base:
        raise StepError("v2 scenarios need --mediator-url (GET /invitation?didcomm=v2)")
    body = http_json("GET", base.rstrip("/") + "/invitation?didcomm=v2", timeout=10)
    url = body.get("invitation_url") or ""
    if "_oob=" not in url:
        raise StepError(f"GET /invitation?didcomm=v2 gave no _oob invitation: {json.dumps(body)[:300]}")
    return url


def need_peers(veramo: bool, indicio: bool):
    if veramo and not (VERAMO_DIR / "node_modules").is_dir():
        raise StepError(f"Veramo is not installed in {VERAMO_DIR}: run scripts/interop-setup.sh v2")
    if indicio and not INDICIO_PYTHON:
        raise StepError("INDICIO_PYTHON is not set: eval the last line of scripts/interop-setup.sh v2")


def veramo_mediatee(ctx, wd: Path, inv: str) -> Peer:
    return ctx.own(Peer("veramo-mediatee", ["node", "mediatee.mjs", "--invitation", inv, "--interval-ms", "300",
                                            "--timeout-s", "170"], wd, cwd=VERAMO_DIR))


def veramo_sender(ctx, wd: Path, to: str, count: int, prefix: str, extra=None) -> Peer:
    return ctx.own(Peer("veramo-sender", ["node", "sender.mjs", "--to", to, "--count", str(count), "--prefix", prefix]
                        + (extra or []), wd, cwd=VERAMO_DIR))


def indicio_mediatee(ctx, wd: Path, inv: str, mode: str) -> Peer:
    return ctx.own(Peer(f"indicio-mediatee-{mode}", [INDICIO_PYTHON, "-W", "ignore", str(HERE / "indicio" / "mediatee.py"),
                                                      "--invitation", inv, "--mode", mode, "--timeout-s", "170"], wd))


def indicio_sender(ctx, wd: Path, to: str, count: int, prefix: str, anoncrypt: bool) -> Peer:
    argv = [INDICIO_PYTHON, "-W", "ignore", str(HERE / "indicio" / "sender.py"), "--to", to, "--count", str(count),
            "--prefix", prefix]
    return ctx.own(Peer("indicio-sender", argv + (["--anoncrypt"] if anoncrypt else []), wd))


def _run(ctx, name: str, mediatee_fn, sender_fn, prefix: str) -> str:
    wd = ctx.workdir(name)
    inv = v2_invitation(ctx)
    t0 = time.monotonic()
    m = mediatee_fn(wd, inv)
    ready = m.wait_event("ready", 60)
    ready_s = time.monotonic() - t0
    t1 = time.monotonic()
    s = sender_fn(wd, ready["did"])
    code = s.wait_exit(120)
    done = next((e for e in s.events() if e.get("event") == "done"), {})
    if code != 0 or done.get("failed"):
        raise StepError(f"sender: exit {code}, {done}: {s.proc.logs(12)}")
    unique, dups = m.wait_received(prefix, ctx.count, 90)
    deliver_s = time.monotonic() - t1
    time.sleep(2.0)  # not synchronisation: a window in which late duplicates would show
    unique, dups = m.received(prefix)
    if dups:
        raise StepError(f"{dups} duplicates among {unique} messages")
    return f"{unique}/{ctx.count} delivered once; mediation in {ready_s:.1f}s, delivered after {deliver_s:.1f}s"


def scenario_v2_veramo(ctx) -> str:
    need_peers(True, False)
    prefix = "v2-veramo"
    return _run(ctx, "v2-veramo",
                lambda wd, inv: veramo_mediatee(ctx, wd, inv),
                lambda wd, to: veramo_sender(ctx, wd, to, ctx.count, prefix),
                prefix)


def scenario_v2_indicio_live(ctx) -> str:
    need_peers(False, True)
    prefix = "v2-indicio-live"
    return _run(ctx, "v2-indicio-live",
                lambda wd, inv: indicio_mediatee(ctx, wd, inv, "live"),
                lambda wd, to: indicio_sender(ctx, wd, to, ctx.count, prefix, anoncrypt=False),
                prefix)


def scenario_v2_indicio_poll(ctx) -> str:
    need_peers(False, True)
    prefix = "v2-indicio-poll"
    return _run(ctx, "v2-indicio-poll",
                lambda wd, inv: indicio_mediatee(ctx, wd, inv, "poll"),
                lambda wd, to: indicio_sender(ctx, wd, to, ctx.count, prefix, anoncrypt=False),
                prefix)


def scenario_v2_indicio_to_veramo(ctx) -> str:
    need_peers(True, True)
    prefix = "v2-indicio-to-veramo"
    return _run(ctx, "v2-indicio-to-veramo",
                lambda wd, inv: veramo_mediatee(ctx, wd, inv),
                lambda wd, to: indicio_sender(ctx, wd, to, ctx.count, prefix, anoncrypt=True),
                prefix)


SCENARIOS = [
    ("v2-veramo", scenario_v2_veramo),
    ("v2-indicio-live", scenario_v2_indicio_live),
    ("v2-indicio-poll", scenario_v2_indicio_poll),
    ("v2-indicio-to-veramo", scenario_v2_indicio_to_veramo),
]
