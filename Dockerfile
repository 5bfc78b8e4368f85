# syntax=docker/dockerfile:1
#
# Portcullis container image: multi-stage, non-root, no shell tools beyond Debian slim.
#
#   docker build -t portcullis .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v $PWD/portcullis.toml:/etc/portcullis/portcullis.toml:ro \
#     -v portcullis-state:/var/lib/portcullis \
#     --stop-timeout 45 portcullis
#
# The gateway binds 127.0.0.1 by default, which is unreachable from outside a
# container. The mounted config must say:
#   [listen]
#   public = "0.0.0.0:8080"
#   admin = "0.0.0.0:9090"     # so Prometheus can scrape; publish it only on an internal network
# Quick demo without a config (echo backend, ephemeral key, token on stderr):
#   docker run --rm -p 8080:8080 portcullis serve --demo --public 0.0.0.0:8080 --admin 0.0.0.0:9090
#
# Stopping: SIGTERM drains (listen.drain_delay_s + listen.drain_timeout_s, 30 s by
# default). Docker's default stop timeout is 10 s: use --stop-timeout 45 (compose:
# stop_grace_period: 45s, Kubernetes: terminationGracePeriodSeconds: 45).

# ---------------------------------------------------------------- build
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The whole workspace (the loadtest member and the benches are part of the
# manifest); .dockerignore keeps target/ and .git/ out of the context.
COPY . .
# Cache mounts keep the registry and target/ between builds; the binary is
# copied out of the cache within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portcullis \
 && install -D -m 0755 target/release/portcullis /out/portcullis

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim
# A fixed non-root uid, so volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 portcullis \
 && useradd --system --uid 10001 --gid portcullis --no-create-home \
      --home-dir /var/lib/portcullis --shell /usr/sbin/nologin portcullis \
 && install -d -m 0755 /etc/portcullis \
 && install -d -m 0700 -o portcullis -g portcullis /var/lib/portcullis
COPY --from=build /out/portcullis /usr/local/bin/portcullis
COPY examples/portcullis.toml /usr/share/doc/portcullis/portcullis.toml.example

# The revocation log ([revocation] path, relative to the working directory by
# default) lives in this volume and survives restarts.
WORKDIR /var/lib/portcullis
VOLUME ["/var/lib/portcullis"]
USER portcullis:portcullis

# 8080: public WebSocket listener; 9090: admin (/metrics /healthz /readyz /admin/*).
EXPOSE 8080 9090
STOPSIGNAL SIGTERM

# There is no curl in debian:bookworm-slim; bash's /dev/tcp asks the admin
# listener's /healthz instead (assumes listen.admin on port 9090, bound to
# 0.0.0.0 or 127.0.0.1). Orchestrators with their own HTTP probes should use
# /healthz (liveness) and /readyz (readiness) on the admin port and may drop this.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && timeout 3 head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["portcullis"]
CMD ["serve", "--config", "/etc/portcullis/portcullis.toml"]
