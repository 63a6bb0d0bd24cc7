# Two commands set up and check everything on a fresh machine:
#   make demo   - virtual environment, install, the self-contained demonstration
#   make test   - virtual environment (created or updated), the whole test suite
# plus: make bench (speed and memory), make fuzz (many more property examples),
# make lint (ruff + mypy).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PEERS := tests/peers
# The stamp depends on the sources mypyc compiles, so an edit triggers a rebuild.
SOURCES := pyproject.toml setup.py $(shell find tracer -name '*.py')
NODE_STAMP := $(PEERS)/node_modules/.installed
# grpc-go peers, built offline from Debian's packages (GOPATH mode, nothing downloaded).
GO ?= go
GO_DIR := $(PEERS)/go
GO_STAMP := $(GO_DIR)/bin/.built
GO_SOURCES := $(shell find $(GO_DIR) -name '*.go' -not -path '*/.cache/*' 2>/dev/null)
GO_DEB := golang-go golang-google-grpc-dev
GOCODE := /usr/share/gocode
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv pure demo test bench fuzz lint system-deps node-deps go-peers clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/tracer --version
	touch $(STAMP)

venv: $(STAMP)

# tshark (cross-check of the decoder, benchmark reference), tcpdump (independent
# capture writer in the real-traffic tests), prometheus (promtool checks the alert
# rules; a real Prometheus server scrapes a live agent), bro-aux (bro-cut, Zeek's
# zeek-cut under its older name, reads the conn.log export) and nftables (a router
# namespace's source NAT in the merge test), from Debian's packages when missing.
SYSTEM_DEB := tshark tcpdump prometheus bro-aux nftables
system-deps:
	@if ! command -v tshark >/dev/null || ! command -v tcpdump >/dev/null || \
	    ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || \
	    ! command -v bro-cut >/dev/null || ! command -v nft >/dev/null; then \
		if command -v apt-get >/dev/null; then \
			echo "installing $(SYSTEM_DEB) from Debian's packages"; \
			export DEBIAN_FRONTEND=noninteractive; \
			$(SUDO) apt-get install -y -q --no-install-recommends $(SYSTEM_DEB) >/dev/null 2>&1 || \
			{ $(SUDO) apt-get update -q >/dev/null && \
			  $(SUDO) apt-get install -y -q --no-install-recommends $(SYSTEM_DEB) >/dev/null; } || \
			echo "warning: could not install $(SYSTEM_DEB); the tests that need them skip"; \
		else \
			echo "warning: no apt-get; tests that need $(SYSTEM_DEB) skip"; \
		fi; \
	fi

# @grpc/grpc-js, the independent second gRPC implementation the tests talk to.
$(NODE_STAMP): $(PEERS)/package.json $(PEERS)/package-lock.json
	cd $(PEERS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

node-deps:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(NODE_STAMP); \
	else echo "warning: no npm; the grpc-js tests skip"; fi

# grpc-go, the third independent gRPC implementation the tests talk to: Debian's
# golang-go and golang-google-grpc-dev (which brings x/net, genproto and protobuf as
# source under $(GOCODE)), built in GOPATH mode with no module proxy: offline. The
# sources are copied into a temporary GOPATH as package grpcpeers; the build cache stays
# in $(GO_DIR)/.cache. Rebuilt only when a .go file changes.
$(GO_STAMP): $(GO_SOURCES)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	mkdir -p "$$tmp/src/grpcpeers" $(GO_DIR)/bin && \
	cp -R $(GO_DIR)/greeter $(GO_DIR)/grpcgo-server $(GO_DIR)/grpcgo-client "$$tmp/src/grpcpeers/" && \
	echo "building the grpc-go peers (Debian golang-google-grpc-dev" \
		"$$(dpkg-query -W -f '$${Version}' golang-google-grpc-dev 2>/dev/null || echo '?'))" && \
	env GO111MODULE=off GOPROXY=off GOFLAGS= GOENV=off GOTOOLCHAIN=local CGO_ENABLED=0 \
		GOPATH="$$tmp:$(GOCODE)" GOCACHE="$(abspath $(GO_DIR))/.cache" \
		$(GO) build -o "$(abspath $(GO_DIR))/bin/" grpcpeers/grpcgo-server grpcpeers/grpcgo-client
	@echo "grpc-go peers: $$($(GO_DIR)/bin/grpcgo-server --version) in $(GO_DIR)/bin"
	@touch $(GO_STAMP)

go-peers:
	@if ! command -v $(GO) >/dev/null || [ ! -f $(GOCODE)/src/google.golang.org/grpc/version.go ]; then \
		if command -v apt-get >/dev/null; then \
			echo "installing $(GO_DEB) from Debian's packages"; \
			export DEBIAN_FRONTEND=noninteractive; \
			$(SUDO) apt-get install -y -q $(GO_DEB) >/dev/null 2>&1 || \
			{ $(SUDO) apt-get update -q >/dev/null && \
			  $(SUDO) apt-get install -y -q $(GO_DEB) >/dev/null; } || \
			echo "warning: could not install $(GO_DEB); the grpc-go tests skip"; \
		else \
			echo "warning: no apt-get; the grpc-go tests skip"; \
		fi; \
	fi
	@if command -v $(GO) >/dev/null && [ -f $(GOCODE)/src/google.golang.org/grpc/version.go ]; then \
		$(MAKE) --no-print-directory $(GO_STAMP) || \
		echo "warning: the grpc-go peers did not build; the grpc-go tests skip"; \
	else echo "warning: no go or no grpc-go sources in $(GOCODE); the grpc-go tests skip"; fi

demo: $(STAMP)
	$(VENV)/bin/tracer demo
	@echo "tracer is $(VENV)/bin/tracer; '. $(VENV)/bin/activate' puts it on your PATH"

# The whole suite against the installed (compiled) core, then the core's own tests once
# more against the plain sources, interpreted: both builds must behave the same (the live
# tests among them once, compiled).
PURE_TESTS := tests/test_build.py tests/test_decode.py tests/test_sleep.py tests/test_crafted.py tests/test_hpack.py \
	tests/test_pcapfile.py tests/test_properties.py tests/test_shared_captures.py tests/test_core_structure.py \
	tests/test_unix.py

test: $(STAMP) system-deps node-deps go-peers
	$(PY) -m pytest -q
	rm -rf build/pure && mkdir -p build/pure && \
	tar cf - --exclude='*.so' tracer store cli | tar xf - -C build/pure && \
	cd build/pure && TRACER_EXPECT_BUILD=interpreted $(abspath $(PY)) -m pytest -q \
		-p no:cacheprovider -m "not live" --rootdir=$(CURDIR) $(addprefix $(CURDIR)/,$(PURE_TESTS))

# tcpreplay drives the live agent's benchmark (benchmarks/live.py, which needs root);
# tcptrace is the C floor the file benchmark compares with (benchmarks/run.py).
bench: $(STAMP) system-deps
	@if ! command -v tcpreplay >/dev/null || ! command -v tcptrace >/dev/null; then \
		if command -v apt-get >/dev/null; then \
			echo "installing tcpreplay and tcptrace from Debian's packages"; \
			export DEBIAN_FRONTEND=noninteractive; \
			$(SUDO) apt-get install -y -q tcpreplay tcptrace >/dev/null 2>&1 || \
			{ $(SUDO) apt-get update -q >/dev/null && \
			  $(SUDO) apt-get install -y -q tcpreplay tcptrace >/dev/null; } || \
			echo "warning: could not install tcpreplay/tcptrace; the benchmarks that need them skip"; \
		else \
			echo "warning: no apt-get; the benchmarks that need tcpreplay/tcptrace skip"; \
		fi; \
	fi
	$(PY) benchmarks/run.py
	$(PY) benchmarks/live.py
	$(PY) benchmarks/report.py
	$(PY) benchmarks/logs.py
	$(PY) benchmarks/longrun.py
	$(PY) benchmarks/attribution.py --background 200 --repeat 3
	$(PY) benchmarks/unix.py

# The property and fuzz tests with 20 times the examples CI runs, and fresh random ones
# each time (a failure prints the blob that replays it). FUZZ_SCALE=100 for longer.
FUZZ_SCALE ?= 20
fuzz: $(STAMP)
	TRACER_PROPERTY_SCALE=$(FUZZ_SCALE) TRACER_PROPERTY_RANDOM=1 $(PY) -m pytest -q tests/test_properties.py

# ruff over the whole tree (the rules are in pyproject.toml), then mypy strict over the
# packages pyproject.toml lists.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Drop the compiled modules: the sources run interpreted (for quick edit-and-test loops).
pure:
	find tracer -name '*.so' -delete
	rm -f *__mypyc*.so $(STAMP)

clean: pure
	rm -rf $(VENV) $(PEERS)/node_modules $(GO_DIR)/bin $(GO_DIR)/.cache .pytest_cache .mypy_cache build
