# staps: the commands a newcomer needs. `make run` serves on 127.0.0.1:8080 in
# the foreground; `make test` is what CI runs.

SHELL := /bin/bash
CARGO ?= cargo
LISTEN ?= 127.0.0.1:8080

PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all build run test lint unit bench soak fuzz conformance deb install uninstall clean

all: build

build:
	$(CARGO) build --release --locked

# Foreground, no config file, verbose: for trying it out.
run:
	$(CARGO) run --release --locked -- -c /dev/null --listen $(LISTEN) -v

# Formatting and lints first (cheap), then every test.
test: lint unit

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit:
	$(CARGO) test --locked

# The load generator (benches/load.rs): staps (release build) side by side
# with wsbroad, installed when missing. SCENARIOS="fanout many idle churn http
# relay" picks some (fanout-64 and fanout-4k one fan-out size; http, staps
# alone: POSTs on one connection and fan-out to SSE listeners); RUNS=3 runs
# each; STAPS_BIN=path runs another staps build instead of this one.
RUNS ?= 3
bench:
	command -v wsbroad > /dev/null || $(CARGO) install wsbroad --locked
	$(CARGO) bench --locked --bench load -- $(SCENARIOS) --runs $(RUNS)

# 10 000 connections held, 100 000 connect/exchange/disconnect cycles, and
# whether threads and descriptors return to the baseline (a few minutes; needs
# `ulimit -n` above 20 000; see docs/reliability.md).
soak:
	$(CARGO) bench --locked --bench load -- soak

# cargo fuzz (nightly toolchain, cargo-fuzz installed when missing): each
# target for FUZZ_TIME seconds from its corpus in fuzz/corpus/, which it grows.
# The long run reported in docs/reliability.md is FUZZ_TIME=600.
FUZZ_TIME ?= 30
FUZZ_TARGETS ?= head path config frames token
fuzz:
	rustup run nightly rustc --version > /dev/null \
		|| { echo "make fuzz needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
	command -v cargo-fuzz > /dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p target
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		echo "fuzz target $$t, $(FUZZ_TIME) s"; \
		$(CARGO) +nightly fuzz run $$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_TIME) -print_final_stats=1 > target/fuzz-$$t.log 2>&1 \
			|| { tail -n 40 target/fuzz-$$t.log; exit 1; }; \
		grep -E '^(Done|stat::number_of_executed_units)' target/fuzz-$$t.log; \
	done

# RFC 6455 conformance: the Autobahn|Testsuite fuzzing client (PyPI, Python
# 2.7 only; pyenv's 2.7.18 or PYTHON27=...) in a virtualenv under target/,
# against staps with a mirror client (examples/mirror.rs). Reports in
# target/autobahn-reports/index.html. CASES="1.* 2.*" picks some.
PYTHON27 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/2.7*/bin/python) python2.7)
AUTOBAHN ?= target/autobahn
CASES ?= 1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*
conformance:
	$(CARGO) build --release --locked --bin staps --example mirror
	[ -x $(AUTOBAHN)/bin/wstest ] || { \
		$(PYTHON27) -m virtualenv --version > /dev/null 2>&1 \
			|| $(PYTHON27) -m pip install -q 'virtualenv<20.22' \
		&& $(PYTHON27) -m virtualenv -q $(AUTOBAHN) \
		&& $(AUTOBAHN)/bin/pip install -q autobahntestsuite==25.10.1; }
	python3 tests/conformance/run.py --staps target/release/staps \
		--mirror target/release/examples/mirror --wstest $(AUTOBAHN)/bin/wstest \
		--cases "$(shell echo $(CASES) | tr ' ' ,)" --out target/autobahn-reports

# target/debian/staps_<version>_<arch>.deb; installs cargo-deb when missing.
deb: build
	command -v cargo-deb > /dev/null || $(CARGO) install cargo-deb --locked
	gzip -9n -c packaging/staps.1 > target/staps.1.gz
	gzip -9n -c packaging/debian/changelog > target/changelog.gz
	$(CARGO) deb --no-build --output target/debian/

# For those who do not use the package: binary, man page, config (kept if
# present), units and init script as examples. PREFIX and DESTDIR as usual.
install: build
	install -D -m 0755 target/release/staps $(DESTDIR)$(PREFIX)/bin/staps
	install -D -m 0644 packaging/staps.1 $(DESTDIR)$(PREFIX)/share/man/man1/staps.1
	[ -e $(DESTDIR)/etc/staps/staps.conf ] || install -D -m 0644 staps.conf $(DESTDIR)/etc/staps/staps.conf
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/doc/staps/examples \
		staps.service packaging/staps.socket packaging/staps.init packaging/staps.default \
		packaging/nginx-staps.conf packaging/apache-staps.conf

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/staps $(DESTDIR)$(PREFIX)/share/man/man1/staps.1
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/staps

clean:
	$(CARGO) clean
