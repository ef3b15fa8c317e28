# sluice: two commands from a fresh machine (as root).
#   make demo   installs what it needs, builds, brings up a one-node testbed, runs traffic, prints results
#   make test   fmt + clippy + every test (privileged ones included when run as root); .ci/run calls it
SHELL := /bin/bash
CARGO ?= cargo
DEMO_CLUSTER ?= testbed/clusters/demo.yaml

.PHONY: deps build demo test bench clean-testbeds

deps:
	bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --bins

demo: build
	bash scripts/demo.sh $(DEMO_CLUSTER)

test: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# Integration tests of testbed/perf spawn the agent and CNI binaries: build them first.
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

bench: deps
	$(CARGO) bench -p dataplane --bench pipeline
	$(CARGO) bench -p dataplane --bench services
	$(CARGO) bench -p dataplane --bench policy
