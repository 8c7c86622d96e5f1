# Sourced by the scripts that start mediators on free loopback ports.
#
# free_ports N: N free TCP ports on 127.0.0.1, space-separated, bound all at the same time, so
# no two are the same (picked one at a time, bound and released, the kernel may hand the same
# port out twice: "cluster address ... is used twice"). They are released before the caller's
# children bind them. The Rust tests go further and hand mailroom the bound sockets themselves
# (tests/common/ports.rs).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
