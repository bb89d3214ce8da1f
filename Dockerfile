# syntax=docker/dockerfile:1
# A small image of p2p-node: built in the Rust image, run from distroless (glibc and CA
# certificates, no shell) as an unprivileged user, state in the /data volume.
#
#   docker build -t p2p-node .
#   docker run -d --name p2p-node -v p2p-node:/data \
#     -p 4001:4001/tcp -p 4001:4001/udp -p 127.0.0.1:9090:9090 p2p-node
#   docker exec p2p-node p2p-node status
#
# Extra flags go after the image name (they replace CMD), e.g. `--bootstrap /ip4/.../p2p/...`;
# or mount a config file and pass `--config /etc/p2p-node/config.toml`.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target dir are cache mounts: a rebuild after a code change reuses the
# compiled dependencies.
# Stripped: about 27 MB instead of 170 MB with line tables.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p p2p-node \
 && install -D -m 0755 target/release/p2p-node /out/p2p-node \
 && install -d -o 65532 -g 65532 -m 0700 /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/p2p-node /usr/local/bin/p2p-node
COPY --from=build --chown=65532:65532 /data /data
ENV P2P_NODE_DATA_DIR=/data
VOLUME ["/data"]
# Peers: TCP and QUIC on 4001. API, metrics and dashboard: 9090 (publish it on loopback).
EXPOSE 4001/tcp 4001/udp 9090/tcp
USER nonroot
ENTRYPOINT ["/usr/local/bin/p2p-node"]
# Inside the container the API listens on all of the container's interfaces so that a port
# can be published; `-p 127.0.0.1:9090:9090` keeps it on the host's loopback.
CMD ["run", "--no-mdns", "--listen", "/ip4/0.0.0.0/tcp/4001", "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1", "--api-addr", "0.0.0.0:9090"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s \
  CMD ["/usr/local/bin/p2p-node", "status", "--json", "--api", "127.0.0.1:9090"]
