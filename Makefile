# Proofmesh: build, test and benchmark. `make help` lists the targets.
#
# One cargo profile (dev, optimised: see Cargo.toml) serves builds, tests and benchmarks, so
# everything compiles once.

CARGO ?= cargo
SETUP_DIR ?= .setup-cache
GEOMETRY ?= default
BIN := target/debug/proofmesh-circuits

.PHONY: help build test bench samples prove-samples clean-setup

help:
	@echo "make build          build every crate"
	@echo "make test           unit and integration tests (real proofs; ~3 min after the build)"
	@echo "make bench          per-circuit figures and the largest sample proven end to end"
	@echo "make samples        regenerate samples/ with gen-batch"
	@echo "make prove-samples  prove and verify every sample batch (GEOMETRY=default|small)"
	@echo "make clean-setup    delete cached setup data ($(SETUP_DIR))"

build:
	$(CARGO) build --workspace --all-targets

test:
	$(CARGO) test --workspace

bench: build
	PROOFMESH_SETUP_DIR=$(SETUP_DIR) $(BIN) bench --samples samples --geometry $(GEOMETRY)

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
