# syntax=docker/dockerfile:1
# sci-agent image. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t sci-cf/sci-agent:0.1.0 .
# The build stage provisions what the eBPF build needs (nightly rust-src and
# a bpf-linker built against nightly's LLVM: `cargo xtask setup --build-only`)
# and builds the release binary with its eBPF object embedded. The image runs
# it alone: the kernel side needs CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE
# (granted by the DaemonSet), hostPID, and /sys/fs/cgroup and /sys/kernel/btf
# of the node (read-only).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only \
    && cargo build --release --locked -p sci-agent --bin sci-agent \
    && install -D -m 0755 target/release/sci-agent /out/sci-agent

FROM debian:bookworm-slim
COPY --from=build /out/sci-agent /usr/local/bin/sci-agent
COPY deploy/agent.toml /etc/sci-agent/agent.toml
# Metrics and /healthz (agent.metrics_listen); transaction ingest is loopback only.
EXPOSE 9464
# Root inside the container, as the agent must read /proc of every pid; the
# DaemonSet drops every capability but the three it uses.
# hadolint ignore=DL3002
USER 0
ENTRYPOINT ["/usr/local/bin/sci-agent"]
CMD ["run", "--config", "/etc/sci-agent/agent.toml"]
