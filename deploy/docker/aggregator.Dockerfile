# syntax=docker/dockerfile:1
# sci-aggregator image. Build from the repository root:
#   docker build -f deploy/docker/aggregator.Dockerfile -t sci-cf/sci-aggregator:0.1.0 .
# No eBPF here: the stable toolchain of the rust image builds it (protox
# compiles the .proto files, no protoc needed).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sci-aggregator --bin sci-aggregator \
    && install -D -m 0755 target/release/sci-aggregator /out/sci-aggregator

FROM debian:bookworm-slim
COPY --from=build /out/sci-aggregator /usr/local/bin/sci-aggregator
COPY deploy/aggregator.toml /etc/sci-aggregator/aggregator.toml
# The store (SQLite) and the remote-write state live on a volume.
RUN useradd --system --uid 10001 --home-dir /var/lib/sci-aggregator --create-home sci
USER 10001
VOLUME ["/var/lib/sci-aggregator"]
# gRPC ingest (mutual TLS), then the HTTP API, dashboard and /metrics.
EXPOSE 7443 8080
ENTRYPOINT ["/usr/local/bin/sci-aggregator"]
CMD ["serve", "--config", "/etc/sci-aggregator/aggregator.toml"]
