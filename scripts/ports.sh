# Sourced by the scripts that start mediators on free loopback ports.
#
# free_ports N: N free TCP ports on 127.0.0.1, space-separated, bound all at the same time, so
# no two are the same (picked one at a time, bound and released, the kernel may hand the same
# port out twice: "cluster address ... is used twice"). They are released before the caller's
# children bind them, so they are drawn from below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range): the source port of an outgoing connection, or a listener on
# port 0, never takes one in between. The Rust tests go further and hand mailroom the bound
# sockets themselves (tests/common/ports.rs).
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys
want = int(sys.argv[1])
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    eph_low = int(f.read().split()[0])
low, high = 10000, eph_low - 1
if high - low < 1000:
    sys.exit(f"free_ports: ephemeral range starts at {eph_low}: no room below it")
socks = []
for port in random.sample(range(low, high + 1), high - low + 1):
    if len(socks) == want:
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    socks.append(s)
if len(socks) < want:
    sys.exit(f"free_ports: only {len(socks)} of {want} free ports in {low}-{high}")
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
