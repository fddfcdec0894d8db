# Proofmesh: build, test and benchmark. `make help` lists the targets.
#
# One cargo profile (dev, optimised: see Cargo.toml) serves builds, tests and benchmarks, so
# everything compiles once.

CARGO ?= cargo
SETUP_DIR ?= .setup-cache
GEOMETRY ?= default
ARTIFACTS ?=
GATEWAY_MODE ?= inbox
TLS ?= on
BIN := target/debug/proofmesh-circuits

.PHONY: help demo chaos build test bench samples prove-samples clean-setup

help:
	@echo "make demo           the cluster on 127.0.0.1 proves and verifies every sample batch"
	@echo "                    (ARTIFACTS=s3://BUCKET/PREFIX?endpoint=...|moto, GATEWAY_MODE=inbox|client|server)"
	@echo "make build          build every crate"
	@echo "make chaos          the cluster proves batches while processes, the scheduler and PostgreSQL are killed"
	@echo "make test           unit and integration tests (real proofs), then a short chaos run"
	@echo "make bench          per-circuit figures and the largest sample proven end to end"
	@echo "make samples        regenerate samples/ with gen-batch"
	@echo "make prove-samples  prove and verify every sample batch (GEOMETRY=default|small)"
	@echo "make clean-setup    delete cached setup data ($(SETUP_DIR))"

build:
	$(CARGO) build --workspace --all-targets

# The cluster test runs the workspace's binaries, so they are built first; the tests get a
# throwaway PostgreSQL unless DATABASE_URL is set, and the real clients they drive (grpcurl,
# prometheus_client) from .venv (scripts/test-tools.sh). The scripts' checks and the short chaos
# run use mutual TLS (proofmesh-dev-ca makes their certificates); the chaos run reuses the setup
# data the tests built (small geometry) and always runs its own PostgreSQL (it restarts it).
test:
	$(CARGO) build --workspace --bins
	scripts/test-tools.sh
	scripts/chart-test.sh
	PATH="$(CURDIR)/.venv/bin:$$PATH" scripts/with-postgres.sh $(CARGO) test --workspace
	$(CARGO) build -p proofmesh-proto --features test-ca --bin proofmesh-dev-ca
	SETUP_DIR=target/tmp/setup-cache scripts/scripts-test.sh
	SETUP_DIR=target/tmp/setup-cache scripts/chaos.sh --short

chaos:
	$(CARGO) build --workspace --bins
	$(CARGO) build -p proofmesh-proto --features test-ca --bin proofmesh-dev-ca
	SETUP_DIR=$(SETUP_DIR) scripts/chaos.sh

demo:
	$(CARGO) build --workspace --bins
	$(CARGO) build -p proofmesh-proto --features test-ca --bin proofmesh-dev-ca
	GEOMETRY=$(GEOMETRY) SETUP_DIR=$(SETUP_DIR) ARTIFACTS=$(ARTIFACTS) GATEWAY_MODE=$(GATEWAY_MODE) TLS=$(TLS) scripts/demo.sh

# Circuit figures first (they also build the setup cache the cluster benchmark loads, and write
# the job weights: peak memory per circuit, for the scheduler's --job-weights), then the
# cluster's: dispatch latency and lease throughput, setup-data affinity, witness-vector stream
# throughput, batch efficiency.
bench: build
	PROOFMESH_SETUP_DIR=$(SETUP_DIR) $(BIN) bench --samples samples --geometry $(GEOMETRY) --weights-out scheduler/job-weights.toml
	scripts/with-postgres.sh target/debug/proofmesh-bench all --geometry $(GEOMETRY) --setup-dir $(SETUP_DIR)
	target/debug/proofmesh-bench fleet --out target/fleet-bench.json

samples: build
	rm -f samples/batch_*.bin
	$(BIN) gen-batch --out samples --seed 2026 --txs 4 --txs 40 --txs 1000

prove-samples: build
	@for b in samples/batch_*.bin; do \
	  $(BIN) --setup-dir $(SETUP_DIR) prove --batch $$b --out out --geometry $(GEOMETRY) || exit 1; \
	  p=out/$$(basename $$b .bin).proof; \
	  $(BIN) --setup-dir $(SETUP_DIR) verify --proof $$p --batch $$b || exit 1; \
	done

clean-setup:
	rm -rf $(SETUP_DIR)
