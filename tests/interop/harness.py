"""Processes and HTTP plumbing for the interop scenarios (Python stdlib only).

Every peer is a real process bound to 127.0.0.1: Credo agents (tests/interop/credo/agent.mjs,
steered over its JSON control API) and ACA-Py agents (steered over their admin API, with a
webhook listener here). Each process is started by this module, its PID recorded, and only
that PID is ended. Logs go to files in the scenario's work directory and are shown on failure.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
CREDO_DIR = HERE / "credo"
LOOPBACK = "127.0.0.1"


class StepError(Exception):
    """A scenario step failed; the message is the reason printed with FAIL."""


_HANDED_OUT: set = set()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 for a peer that binds it seconds later (ACA-Py).

    Drawn from below the kernel's ephemeral range, as scripts/ports.sh does: a port the OS
    chose for port 0 is released until the peer binds it, and meanwhile the source port of any
    outgoing connection may take it. Never the same port twice in one run.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        eph_low = int(f.read().split()[0])
    low, high = 10000, eph_low - 1
    if high - low < 1000:
        # No room below the range on this machine: the OS's choice, as before.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            return s.getsockname()[1]
    for port in random.sample(range(low, high + 1), high - low + 1):
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise StepError("free_port: no free port below the ephemeral range")


def http_json(method: str, url: str, body=None, timeout: float = 30.0, ok=range(200, 300)):
    """A JSON request; returns the decoded body. Raises StepError with the server's text."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        raise StepError(f"{method} {url}: {e}") from e
    text = raw.decode("utf-8", "replace")
    if status not in ok:
        raise StepError(f"{method} {url} -> {status}: {text[:400]}")
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return {"_text": text}


def wait_until(pred, timeout: float, what: str, every: float = 0.2):
    """Polls pred() until it returns a truthy value; StepError after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_err = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except StepError as e:
            last_err = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last_err})" if last_err else ""
            raise StepError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(every)


def tail(path: Path, lines: int = 25) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(data[-lines:])


# Every process started here and not yet seen to exit, by PID: what end_all() ends when the
# runner is told to stop (SIGTERM/SIGINT), whatever the scenario was doing at that moment.
_LIVE: dict[int, "Proc"] = {}
_LIVE_LOCK = threading.Lock()
# While a process is being started and registered, a termination signal is held back (see
# spawning() and hold_signal()): ending the runner between fork and registration would leak it.
_spawning = False
_held_signal: int | None = None


def spawning() -> bool:
    return _spawning


def hold_signal(signum: int):
    """Called by the runner's handler while spawning(): re-raised once the child is registered."""
    global _held_signal
    _held_signal = signum


def end_all(grace: float = 5.0) -> list[str]:
    """Ends every process started here that is still running: SIGTERM to each PID, up to
    `grace` seconds for all of them together, then SIGKILL. Returns the names it ended."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    ended = []
    for p in procs:
        if p.popen.poll() is None:
            ended.append(p.name)
            p.ended_here = True
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while any(p.popen.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.popen.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        with _LIVE_LOCK:
            _LIVE.pop(p.pid, None)
    return ended


class Proc:
    """A child process whose stdout/stderr go to files; stop() ends only this PID."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict | None = None, cwd=None):
        global _spawning, _held_signal
        self.name = name
        self.out = workdir / f"{name}.out.log"
        self.err = workdir / f"{name}.err.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._out_f = open(self.out, "wb")
        self._err_f = open(self.err, "wb")
        _spawning = True
        try:
            self.popen = subprocess.Popen(
                argv, stdout=self._out_f, stderr=self._err_f, stdin=subprocess.DEVNULL,
                env=full_env, cwd=cwd, start_new_session=True,
            )
            self.pid = self.popen.pid
            self.ended_here = False  # set before this harness signals it (stop, end_all)
            with _LIVE_LOCK:
                _LIVE[self.pid] = self
        finally:
            _spawning = False
            held, _held_signal = _held_signal, None
        if held is not None:
            signal.raise_signal(held)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_text(self) -> str:
        """How the process ended: 'exited with code N' or 'killed by SIGNAME'."""
        rc = self.popen.poll()
        if rc is None:
            return "still running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with code {rc}"

    def crash(self) -> str | None:
        """Why the process is gone when it died of a signal this harness did not send (a
        segfault or abort in the peer's native code, the OOM killer); None otherwise."""
        rc = self.popen.poll()
        if rc is None or rc >= 0 or self.ended_here:
            return None
        return f"{self.name} {self.exit_text()}"

    def wait_line(self, prefix: str, timeout: float) -> str:
        """Waits for a stdout line starting with prefix; StepError if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if not self.alive():
                raise StepError(f"{self.name} {self.exit_text()} before '{prefix}': {self.logs(12)}")
            if time.monotonic() > deadline:
                raise StepError(f"{self.name} not ready after {timeout:.0f}s: {self.logs(12)}")
            time.sleep(0.1)

    def logs(self, lines: int = 25) -> str:
        parts = []
        for p in (self.err, self.out):
            t = tail(p, lines)
            if t.strip():
                parts.append(f"[{p.name}] {t}")
        return " | ".join(parts).replace("\n", "\n    ")

    def last_error(self) -> str:
        """The last line of stderr that names an error or exception (a short FAIL reason)."""
        lines = tail(self.err, 400).splitlines()
        for line in reversed(lines):
            if re.search(r"(Error|Exception)\b.*:|\bERROR\b", line):
                return line.strip()[:400]
        return lines[-1].strip()[:400] if lines else ""

    def credo_errors(self, limit: int = 3) -> list[str]:
        """Distinct Credo `ERROR:` headlines from stderr, each with the first validation detail
        that follows it (Credo logs the cause as multi-line JSON)."""
        out: list[str] = []
        lines = tail(self.err, 2000).splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("ERROR: "):
                continue
            head = line[len("ERROR: "):].rstrip(" {")
            detail = ""
            for nxt in lines[i + 1:i + 12]:
                m = re.search(r"(property [^\\]*constraints: [^\\]*)", nxt)
                if m:
                    detail = f" ({m.group(1).strip()})"
                    break
            entry = head + detail
            if entry not in out:
                out.append(entry)
            if len(out) >= limit:
                break
        return out

    def stop(self, grace: float = 10.0):
        if self.alive():
            self.ended_here = True
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
        with _LIVE_LOCK:
            _LIVE.pop(self.pid, None)
        self._out_f.close()
        self._err_f.close()


class CredoAgent:
    """tests/interop/credo/agent.mjs in its own Node process."""

    def __init__(self, name: str, workdir: Path, role: str, mediator_invitation: str | None = None,
                 pickup: str | None = None, polling_ms: int = 1000, ready_timeout: float = 60.0):
        data = workdir / f"{name}-data"
        data.mkdir(parents=True, exist_ok=True)
        argv = [os.environ.get("NODE", "node"), str(CREDO_DIR / "agent.mjs"),
                "--role", role, "--label", name, "--data", str(data), "--polling-ms", str(polling_ms)]
        if mediator_invitation:
            argv += ["--mediator-invitation", mediator_invitation]
        if pickup:
            argv += ["--pickup", pickup]
        self.name = name
        self.control = None
        self.ready_timeout = ready_timeout
        self._t0 = time.monotonic()
        self.proc = Proc(name, argv, workdir, cwd=str(CREDO_DIR))

    def wait_ready(self) -> "CredoAgent":
        """Waits for the READY line (a mediatee prints it once mediation is granted)."""
        if self.control is None:
            line = self.proc.wait_line("READY ", self.ready_timeout)
            self.ready_s = time.monotonic() - self._t0
            self.control = json.loads(line[len("READY "):])["control"]
        return self

    def call(self, method: str, path: str, body=None, timeout: float = 60.0):
        try:
            return http_json(method, self.control + path, body, timeout=timeout)
        except StepError as e:
            if not self.proc.alive():
                raise StepError(f"{self.name} died ({self.proc.exit_text()}): {self.proc.logs(12)}") from e
            raise

    def create_invitation(self) -> dict:
        return self.call("POST", "/oob/create", {})

    def receive_invitation(self, url: str, timeout: float = 30.0) -> str:
        r = self.call("POST", "/oob/receive", {"invitationUrl": url, "timeoutMs": int(timeout * 1000)},
                      timeout=timeout + 10)
        return r["connectionId"]

    def wait_connection(self, oob_id: str, timeout: float = 30.0) -> str:
        r = self.call("POST", "/connection/wait", {"outOfBandId": oob_id, "timeoutMs": int(timeout * 1000)},
                      timeout=timeout + 10)
        return r["connectionId"]

    def send(self, connection_id: str, count: int, prefix: str, concurrency: int = 1, timeout: float = 90.0) -> dict:
        return self.call("POST", "/send", {"connectionId": connection_id, "count": count, "prefix": prefix,
                                           "concurrency": concurrency}, timeout=timeout)

    def received(self, prefix: str) -> dict:
        return self.call("GET", "/received?" + urllib.parse.urlencode({"prefix": prefix}))

    def wait_received(self, prefix: str, count: int, timeout: float) -> dict:
        return self.call("POST", "/received/wait", {"prefix": prefix, "count": count,
                                                    "timeoutMs": int(timeout * 1000)}, timeout=timeout + 10)

    def status(self) -> dict:
        return self.call("GET", "/status")

    def stop_agent(self) -> dict:
        return self.call("POST", "/agent/stop", {}, timeout=30)

    def start_agent(self) -> dict:
        return self.call("POST", "/agent/start", {}, timeout=60)

    def close(self):
        if self.proc.alive() and self.control:
            try:
                http_json("POST", self.control + "/exit", {}, timeout=5)
            except StepError:
                pass
            try:
                self.proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.proc.stop()


class Webhooks:
    """Receives ACA-Py webhooks (POST /topic/<topic>/) on 127.0.0.1 and keeps them by topic."""

    def __init__(self):
        self.events: dict[str, list] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                parts = [p for p in self.path.split("/") if p]
                topic = parts[1] if len(parts) >= 2 and parts[0] == "topic" else self.path
                try:
                    payload = json.loads(body or b"{}")
                except ValueError:
                    payload = {"_raw": body.decode("utf-8", "replace")}
                with outer.lock:
                    outer.events.setdefault(topic, []).append(payload)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def topic(self, name: str) -> list:
        with self.lock:
            return list(self.events.get(name, []))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class AcaPy:
    """An ACA-Py agent: askar wallet in a sqlite file under workdir (ACAPY_HOME), admin API and
    inbound HTTP (and optionally WS) on 127.0.0.1, webhooks to a listener of ours."""

    def __init__(self, name: str, workdir: Path, acapy_bin: str, extra_args: list[str] | None = None,
                 ws: bool = False, ready_timeout: float = 90.0):
        self.name = name
        self.port = free_port()
        self.ws_port = free_port() if ws else None
        self.admin_port = free_port()
        self.admin = f"http://{LOOPBACK}:{self.admin_port}"
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.webhooks = Webhooks()
        home = workdir / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        endpoints = [self.endpoint] + ([f"ws://{LOOPBACK}:{self.ws_port}"] if ws else [])
        argv = [acapy_bin, "start",
                "--label", name,
                "--inbound-transport", "http", LOOPBACK, str(self.port),
                "--outbound-transport", "http",
                "--admin", LOOPBACK, str(self.admin_port), "--admin-insecure-mode",
                "--endpoint", *endpoints,
                "--wallet-type", "askar", "--wallet-name", name, "--wallet-key", f"{name}-interop-key",
                "--wallet-storage-type", "default", "--auto-provision",
                "--no-ledger",
                "--webhook-url", self.webhooks.url,
                "--auto-accept-invites", "--auto-accept-requests",
                "--log-level", os.environ.get("INTEROP_ACAPY_LOG", "warning")]
        if ws:
            argv += ["--inbound-transport", "ws", LOOPBACK, str(self.ws_port), "--outbound-transport", "ws"]
        argv += extra_args or []
        # ACAPY_HOME puts the askar sqlite wallet in the scenario's temp dir, not ~/.acapy_agent.
        self.ready_timeout = ready_timeout
        self.ready_s = None
        self._t0 = time.monotonic()
        self.proc = Proc(name, argv, workdir, env={"ACAPY_HOME": str(home)})

    def wait_ready(self) -> "AcaPy":
        if self.ready_s is None:
            wait_until(lambda: (self.proc.alive() and self._ready()) or self._check_alive(),
                       self.ready_timeout, f"{self.name} admin /status/ready", every=0.3)
            self.ready_s = time.monotonic() - self._t0
        return self

    def _check_alive(self):
        if not self.proc.alive():
            raise StepError(f"{self.name} {self.proc.exit_text()}: {self.proc.logs(15)}")
        return False

    def _ready(self) -> bool:
        try:
            return bool(http_json("GET", self.admin + "/status/ready", timeout=2).get("ready"))
        except StepError:
            return False

    def call(self, method: str, path: str, body=None, timeout: float = 30.0):
        try:
            return http_json(method, self.admin + path, body, timeout=timeout)
        except StepError as e:
            if not self.proc.alive():
                raise StepError(f"{self.name} died ({self.proc.exit_text()}): {self.proc.logs(15)}") from e
            raise

    def create_invitation(self, multi_use: bool = False, mediation_id: str | None = None) -> dict:
        body = {"handshake_protocols": ["https://didcomm.org/didexchange/1.1"], "use_public_did": False,
                "my_label": self.name}
        if mediation_id:
            body["mediation_id"] = mediation_id
        q = urllib.parse.urlencode({"auto_accept": "true", "multi_use": str(multi_use).lower()})
        return self.call("POST", f"/out-of-band/create-invitation?{q}", body)

    def receive_invitation(self, invitation: dict) -> dict:
        q = urllib.parse.urlencode({"auto_accept": "true", "use_existing_connection": "false"})
        return self.call("POST", f"/out-of-band/receive-invitation?{q}", invitation)

    def connection(self, conn_id: str) -> dict:
        return self.call("GET", f"/connections/{conn_id}")

    def wait_active(self, conn_id: str, timeout: float = 30.0) -> dict:
        def ok():
            c = self.connection(conn_id)
            if c.get("state") in ("abandoned", "error"):
                raise StepError(f"{self.name} connection {conn_id} {c.get('state')}: {c.get('error_msg')}")
            return c if c.get("state") in ("active", "completed") else None
        try:
            return wait_until(ok, timeout, f"{self.name} connection {conn_id} active")
        except StepError as e:
            c = {}
            try:
                c = self.connection(conn_id)
            except StepError:
                pass
            raise StepError(f"{e}; state={c.get('state')} rfc23={c.get('rfc23_state')} "
                            f"error={c.get('error_msg')}; last error in {self.name}'s log: "
                            f"{self.proc.last_error()}") from e

    def wait_connection_for_invitation(self, invi_msg_id: str, timeout: float = 30.0) -> dict:
        def find():
            r = self.call("GET", "/connections?" + urllib.parse.urlencode({"invitation_msg_id": invi_msg_id}))
            for c in r.get("results", []):
                if c.get("state") in ("active", "completed"):
                    return c
            return None
        return wait_until(find, timeout, f"{self.name} connection for invitation {invi_msg_id}")

    def send_message(self, conn_id: str, content: str):
        return self.call("POST", f"/connections/{conn_id}/send-message", {"content": content})

    def basic_messages(self, prefix: str) -> tuple[int, int]:
        """(unique, duplicates) of basicmessages webhooks whose content starts with prefix."""
        seen: dict[str, int] = {}
        for m in self.webhooks.topic("basicmessages"):
            c = m.get("content", "")
            if c.startswith(prefix):
                seen[c] = seen.get(c, 0) + 1
        return len(seen), sum(n - 1 for n in seen.values())

    def close(self):
        self.proc.stop()
        self.webhooks.close()
