# warren — build, test and demo. Run as root, or as a user with sudo: only
# the steps that need privilege (apt, BPF, network namespaces) use sudo, and
# they say so before they do.

SHELL      := /bin/bash
GO         ?= go
ROOT       := $(shell id -u)
ifeq ($(ROOT),0)
SUDO       :=
else
SUDO       := sudo -E env "PATH=$(PATH)" "HOME=$(HOME)" "GOCACHE=$(shell $(GO) env GOCACHE)" "GOMODCACHE=$(shell $(GO) env GOMODCACHE)"
endif
# Built tools (SPIRE, kube-apiserver, ...) are cached outside the repo, keyed by version.
TOOLS_DIR  ?= $(or $(WARREN_TOOLS_CACHE),$(HOME)/.cache/warren/tools)
export WARREN_TOOLS_CACHE := $(TOOLS_DIR)
# go test -fuzz time per target: short by default, 60 s in CI.
FUZZTIME   ?= $(if $(CI),60s,10s)
TESTFLAGS  ?=
OUT        := build

APT_PACKAGES := clang-14 llvm libbpf-dev bpftool iproute2 tcpdump tshark gcc libc6-dev \
	python3 python3-h2 nghttp2-client nghttp2-proxy tinyproxy-bin openssl iperf3 wrk stunnel4 haproxy ca-certificates \
	containerd runc containernetworking-plugins conntrack nftables

.PHONY: all deps tools generate build test test-interop fuzz demo bench lint clean-lab clean check-generated

all: build

## deps: install the Debian packages the build and tests need (idempotent; uses sudo when not root).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		[ -n "$(SUDO)" ] && echo "deps: sudo apt-get install $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all Debian packages present"; fi

## tools: build the real components tests run against — SPIRE, kube-apiserver + etcd (envtest),
## the node (kubelet, kube-proxy, kube-controller-manager, kube-scheduler; in kube-apiserver's
## go build), helm and istiod (pilot-discovery) — from their Go modules, cached in $(TOOLS_DIR) by version (cold: see README).
tools: deps
	hack/build-spire.sh
	hack/build-envtest.sh
	hack/build-helm.sh
	hack/build-istiod.sh

## generate: rebuild the BPF objects and their Go bindings with bpf2go (needs clang-14).
generate: deps
	$(GO) generate ./pkg/loader/...

## check-generated: the committed BPF objects match a fresh build of their sources.
check-generated: generate
	@git diff --exit-code --stat -- 'pkg/loader/*_bpfel.go' 'pkg/loader/*_bpfel.o' \
		&& echo "check-generated: committed BPF objects match their sources" \
		|| { echo "committed bpf2go output differs from its sources: run make generate and commit"; exit 1; }

## build: compile every binary into build/.
build:
	@mkdir -p $(OUT)
	$(GO) build -o $(OUT)/ ./cmd/...
	$(GO) build -tags nokube -o $(OUT)/nodeagent-nokube ./cmd/nodeagent

STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

## lint: go vet and staticcheck (built from the module proxy; skipped with a notice if it cannot be fetched).
lint:
	$(GO) vet ./...
	@if $(GO) run $(STATICCHECK) -version >/dev/null 2>&1; then \
		echo "$(GO) run $(STATICCHECK) ./..."; $(GO) run $(STATICCHECK) ./...; \
	else echo "lint: staticcheck $(STATICCHECK) not available from the module proxy; go vet only"; fi

## test: everything CI runs. Privileged tests (BPF, namespaces) run under sudo when not root.
test: deps tools build lint check-generated
	@[ -n "$(SUDO)" ] && echo "test: running go test under sudo (BPF programs and network namespaces need root)" || true
	@mkdir -p $(OUT)
	@rm -f $(OUT)/counts.json
	$(SUDO) $(GO) run ./internal/cmd/cleanlab
	$(GO) build -o $(OUT)/testsummary ./internal/cmd/testsummary
	set -o pipefail; $(SUDO) $(GO) test -count=1 -timeout 40m $(TESTFLAGS) -json ./... 2>&1 | $(OUT)/testsummary -o $(OUT)/test.log -carry $(OUT)/counts.json
	$(MAKE) --no-print-directory test-interop fuzz
	@$(OUT)/testsummary -report $(OUT)/counts.json

## test-interop: HBONE interop against Istio's Go implementation and Debian peers (own go.mod).
test-interop:
	@if [ -f tests/interop/go.mod ]; then \
		$(GO) build -o $(OUT)/testsummary ./internal/cmd/testsummary && \
		cd tests/interop && set -o pipefail && $(SUDO) env GOFLAGS=-mod=mod $(GO) test -count=1 -timeout 20m -json ./... 2>&1 | ../../$(OUT)/testsummary -o ../../$(OUT)/interop.log -carry ../../$(OUT)/counts.json; \
	fi

## fuzz: run each fuzz target for FUZZTIME.
fuzz:
	@grep -rl --include='*_test.go' '^func Fuzz' pkg | while read -r f; do \
		d=$$(dirname $$f); for fn in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$f | sed 's/^func //'); do \
			echo "fuzz: $$fn in ./$$d for $(FUZZTIME)"; \
			$(GO) test -run='^$$' -fuzz="^$$fn$$" -fuzztime=$(FUZZTIME) ./$$d || exit 1; \
		done; done

## demo: a two-node lab with the mesh, traffic, and a report (root; sudo otherwise).
demo: deps build
	@[ -n "$(SUDO)" ] && echo "demo: running under sudo (network namespaces and BPF need root)" || true
	$(SUDO) $(GO) run ./tests/cmd/demo

## bench: the lab benchmark harness (direct vs warren vs stunnel4 and HAProxy mTLS tunnel pairs; waits up to
## 10 min for a 1-minute load under 1.5, then 5 runs, medians and spread, issue 15's targets; ~20 min on 2 cores;
## figures in BENCHMARKS.md; each invocation's JSON is also kept as $(OUT)/bench-<UTC time>.json),
## then the mesh-scale benchmark (tests/scale: 100k workloads, a minute of churn; $(OUT)/scale.{json,md,heap}),
## the Go microbenchmarks of the packages and the HBONE comparison with Istio.
BENCHFLAGS ?= -wait-load 1.5
bench: deps build
	@[ -n "$(SUDO)" ] && echo "bench: running under sudo (network namespaces and BPF need root)" || true
	@mkdir -p $(OUT)
	$(SUDO) $(GO) run ./tests/cmd/bench -json $(OUT)/bench.json -md $(OUT)/bench.md $(BENCHFLAGS)
	cp $(OUT)/bench.json $(OUT)/bench-$$(date -u +%Y%m%dT%H%M%SZ).json
	$(GO) run ./tests/cmd/scale -json $(OUT)/scale.json -md $(OUT)/scale.md -memprofile $(OUT)/scale.heap
	$(SUDO) $(GO) test -run='^$$' -bench=. -benchmem ./pkg/...
	cd tests/interop && GOFLAGS=-mod=mod $(GO) test -run='^$$' -bench=. -benchmem .

## clean-lab: remove namespaces, links, cgroups, pins and processes left by crashed lab runs.
clean-lab:
	$(SUDO) $(GO) run ./internal/cmd/cleanlab

clean:
	rm -rf $(OUT)
