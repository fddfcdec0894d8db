# One image with the five Proofmesh binaries, used by every Deployment of the Helm chart
# (helm/proofmesh): proofmesh-scheduler, -worker, -compressor, -gateway and -circuits.
#   docker build -t ghcr.io/proofmesh/proofmesh:0.1.0 .
# No protoc and no database are needed at build time (protox compiles the .proto files; the
# SQL is checked at run time).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && for b in proofmesh-scheduler proofmesh-worker proofmesh-compressor proofmesh-gateway proofmesh-circuits; do \
      strip --strip-debug -o "/out/$b" "target/release/$b"; \
    done

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 proofmesh \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/proofmesh --shell /usr/sbin/nologin proofmesh \
 && mkdir -p /var/lib/proofmesh/data /var/lib/proofmesh/setup \
 && chown -R 10001:10001 /var/lib/proofmesh
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/proofmesh
# gRPC (scheduler 50051, provers 50061) and Prometheus metrics (9464), as the chart sets them.
EXPOSE 50051 50061 9464
# The chart sets the command per Deployment; alone, the image prints the scheduler's flags.
CMD ["proofmesh-scheduler", "--help"]
