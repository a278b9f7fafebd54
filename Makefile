# hibiki's two commands are `make run` and `make test`; see README.md.
CARGO ?= cargo

.PHONY: run test lint bench build k8s

## run: the whole mesh in one process against local PostgreSQL and Redis
run:
	$(CARGO) run --quiet -p hibiki-cli --bin hibiki -- dev

## test: every test, against the real PostgreSQL and Redis, and the
## Kubernetes manifests validated offline (needs kubectl and kubernetes-validate)
test: k8s
	$(CARGO) test --workspace --all-targets

## k8s: each overlay of k8s/ rendered and validated against Kubernetes' schemas
k8s:
	bash k8s/validate

## lint: formatting and clippy, warnings as errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: every benchmark under bench/, printing its figures
bench:
	bash bench/run

## build: every crate, tests included
build:
	$(CARGO) build --workspace --all-targets
