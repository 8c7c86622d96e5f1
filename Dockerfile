# mailroom container image: one runtime stage, filled two ways.
#
#   Multi-stage (needs a registry for the builder and base images):
#     docker build -t mailroom .
#   With a binary built beforehand (what a CI pipeline does; what scripts/container-test.sh does):
#     cargo build --release --locked --bin mailroom
#     docker build --target runtime-prebuilt -t mailroom .
#
# The image runs `mailroom run` as a non-root user with /etc/mailroom/cluster.toml
# (container/mailroom.toml: one node, sled in the /var/lib/mailroom volume, public 0.0.0.0:8080,
# admin on the container's loopback 127.0.0.1:8081). Mount your own file there, or change the
# addresses and secrets with MAILROOM_* variables (README, "Container image"). Secrets come
# from the environment or mounted files (MAILROOM_ADMIN_TOKEN_FILE, MAILROOM_CLUSTER_SECRET_FILE,
# MAILROOM_STORE_URL_FILE); none is baked in.
#
# Stopping: SIGTERM closes sessions with 1001 and drains requests for up to 10 s
# (SHUTDOWN_GRACE), so give the container a stop timeout above that:
# `docker run --stop-timeout 30`, `podman run --stop-timeout 30`, compose `stop_grace_period: 30s`
# (a Dockerfile cannot set it; Docker's default of 10 s would cut the drain short).

ARG BUILDER=rust:1-bookworm
ARG BASE=debian:bookworm-slim

FROM ${BUILDER} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin mailroom

FROM ${BASE} AS runtime
RUN useradd --uid 10001 --user-group --home-dir /var/lib/mailroom --no-create-home \
        --shell /usr/sbin/nologin mailroom \
    && mkdir -p /var/lib/mailroom /etc/mailroom \
    && chown mailroom:mailroom /var/lib/mailroom
COPY container/mailroom.toml /etc/mailroom/cluster.toml
ENV MAILROOM_CONFIG=/etc/mailroom/cluster.toml
USER mailroom:mailroom
WORKDIR /var/lib/mailroom
VOLUME ["/var/lib/mailroom"]
# public HTTP + WebSocket, admin, cluster peer protocol
EXPOSE 8080 8081 7000
STOPSIGNAL SIGTERM
# `mailroom healthcheck` asks this node's admin /ready (store reachable, listeners up): it
# finds the admin address from the same config and MAILROOM_* variables as `run`.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["mailroom", "healthcheck", "--timeout-ms", "5000"]
ENTRYPOINT ["mailroom"]
CMD ["run"]

# A binary built beforehand (BINARY: its path in the build context).
FROM runtime AS runtime-prebuilt
ARG BINARY=target/release/mailroom
COPY ${BINARY} /usr/local/bin/mailroom

# The default target: the binary compiled by the build stage.
FROM runtime AS runtime-built
COPY --from=build /src/target/release/mailroom /usr/local/bin/mailroom
