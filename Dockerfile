# syntax=docker/dockerfile:1
#
# hibiki's images: the workspace is built once, then each service is copied
# into an image of its own on distroless (glibc, CA certificates, no shell)
# running as the non-root user 65532, which k8s/ expects.
#
#   docker build --target contacts -t hibiki/contacts:dev .
#
# Targets: gateway, contacts, scenario, delivery, analytics, admin-bff, and
# tools (the
# `hibiki` CLI and line-sim, for operators' pods and test clusters). Each
# service image runs `hibiki-<service> serve` by default; `migrate` (the
# Kubernetes init container) and `settings` are its other commands.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the target dir between builds; the
# binaries are copied out of the cached target dir to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p hibiki-gateway -p hibiki-contacts -p hibiki-scenario \
        -p hibiki-delivery -p hibiki-analytics -p hibiki-admin-bff \
        -p hibiki-cli -p hibiki-line-sim \
 && mkdir -p /out \
 && cp target/release/hibiki-gateway target/release/hibiki-contacts \
       target/release/hibiki-scenario target/release/hibiki-delivery \
       target/release/hibiki-analytics target/release/hibiki-admin-bff \
       target/release/hibiki \
       target/release/line-sim /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
CMD ["serve"]

FROM runtime AS gateway
COPY --from=build /out/hibiki-gateway /usr/local/bin/
EXPOSE 8080 50051 9101
ENTRYPOINT ["/usr/local/bin/hibiki-gateway"]

FROM runtime AS contacts
COPY --from=build /out/hibiki-contacts /usr/local/bin/
EXPOSE 50052 9102
ENTRYPOINT ["/usr/local/bin/hibiki-contacts"]

FROM runtime AS scenario
COPY --from=build /out/hibiki-scenario /usr/local/bin/
EXPOSE 50053 9103
ENTRYPOINT ["/usr/local/bin/hibiki-scenario"]

FROM runtime AS delivery
COPY --from=build /out/hibiki-delivery /usr/local/bin/
EXPOSE 50054 9104
ENTRYPOINT ["/usr/local/bin/hibiki-delivery"]

FROM runtime AS analytics
COPY --from=build /out/hibiki-analytics /usr/local/bin/
EXPOSE 50055 9105
ENTRYPOINT ["/usr/local/bin/hibiki-analytics"]

FROM runtime AS admin-bff
COPY --from=build /out/hibiki-admin-bff /usr/local/bin/
EXPOSE 8070 50056 9106
ENTRYPOINT ["/usr/local/bin/hibiki-admin-bff"]

FROM runtime AS tools
COPY --from=build /out/hibiki /out/line-sim /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/hibiki"]
CMD ["--help"]
