# staps: the commands a newcomer needs. `make run` serves on 127.0.0.1:8080 in
# the foreground; `make test` is what CI runs.

CARGO ?= cargo
LISTEN ?= 127.0.0.1:8080

.PHONY: all build run test lint unit clean

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

clean:
	$(CARGO) clean
