# Sourced by scripts that run mailroom containers with Debian's podman on these machines:
# runc (the cgroups are hybrid: crun fails), cgroupfs (no systemd), host networking, the
# hard limits spelled out, and no systemd health timer (`podman healthcheck run` is called).
pm() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
PM_RUN_FLAGS=(--network host --ulimit nofile=20000:20000 --ulimit nproc=4096:4096
  --health-interval disable --stop-timeout 30)
