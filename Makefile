# banger build, test and install targets. `make help` lists them.
GO            ?= go
PREFIX        ?= /usr/local
LIBEXECDIR    ?= $(PREFIX)/lib/banger
VERSION       ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS       := -s -w -X github.com/bangerdev/banger/internal/daemon.Version=$(VERSION)
GOLANGCI_LINT_VERSION := v2.15.0
GOLANGCI_LINT ?= $(shell command -v golangci-lint 2>/dev/null || echo $(HOME)/go/bin/golangci-lint)
TEST_TIMEOUT  ?= 40m
# The packages with goroutines and locks, which `make test` runs again under
# the race detector: the daemon (and what is split out of it below
# internal/daemon/), the store, the agent, netctl and blockdev. A new
# package with concurrency joins this list.
RACE_PKGS     ?= ./internal/daemon/... ./internal/lifecycle/... ./internal/reconciler/... ./internal/supervisor/... ./internal/store/... ./internal/agent/... ./internal/netctl/... ./internal/blockdev/...
# The race run leaves out the data-heavy pipeline tests, which the plain run
# has just passed: under the race detector the Debian bookworm catalog pull
# alone takes over 8 minutes, and they exercise decompression and ext4
# writing, not the daemon's locking.
RACE_SKIP     ?= TestCatalogPullDebianBookworm|TestKernelPullThroughDaemon

.PHONY: help build test test-race test-short lint-go lint-shell lint e2e bench install uninstall clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build banger and the static guest programs into bin/
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/banger ./cmd/banger
	CGO_ENABLED=0 $(GO) build -ldflags '-s -w' -o bin/banger-vsock-agent ./cmd/banger-vsock-agent
	CGO_ENABLED=0 $(GO) build -ldflags '-s -w' -o bin/banger-init ./cmd/banger-init

test: ## Run every test tier (root, network namespaces, loop devices, QEMU guests) as far as this host allows, then the race detector over the concurrent packages
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -skip '$(RACE_SKIP)' $(RACE_PKGS)

test-race: ## Run the race detector over the packages with concurrency (needs cgo: gcc)
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -skip '$(RACE_SKIP)' $(RACE_PKGS)

test-short: ## Run the fast tests only (no VM boots)
	$(GO) test -short -count=1 ./...

e2e: ## Run only the end-to-end VM tests (root, QEMU)
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) -run 'E2E' -v ./test/e2e/...

bench: ## Run the benchmarks and print their figures
	BANGER_BENCH=1 $(GO) test -run 'Bench' -bench . -benchtime 1x -count=1 -timeout 60m -v ./... | grep -E '^(Benchmark|ok|FAIL|---|\s+\S+_test.go)'

lint-go: ## Lint Go code with golangci-lint $(GOLANGCI_LINT_VERSION)
	$(GOLANGCI_LINT) run ./...

lint-shell: ## Run shellcheck over every shell script in the repo
	scripts/shellcheck-all

lint: lint-go lint-shell ## Run both linters

install: build ## Install banger, its guest programs and the systemd unit
	install -D -m 0755 bin/banger $(DESTDIR)$(PREFIX)/bin/banger
	install -D -m 0755 bin/banger-vsock-agent $(DESTDIR)$(LIBEXECDIR)/banger-vsock-agent
	install -D -m 0755 bin/banger-init $(DESTDIR)$(LIBEXECDIR)/banger-init
	install -D -m 0644 packaging/banger.service $(DESTDIR)/etc/systemd/system/banger.service
	@getent group banger >/dev/null || groupadd --system banger || true
	@getent passwd banger-vmm >/dev/null || useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin banger-vmm || true
	@echo "installed; start the daemon with: sudo systemctl daemon-reload && sudo systemctl enable --now banger"

uninstall: ## Remove what install installed (state in /var/lib/banger is kept)
	rm -f $(DESTDIR)$(PREFIX)/bin/banger $(DESTDIR)$(LIBEXECDIR)/banger-vsock-agent $(DESTDIR)$(LIBEXECDIR)/banger-init $(DESTDIR)/etc/systemd/system/banger.service

clean: ## Remove build outputs
	rm -rf bin/
