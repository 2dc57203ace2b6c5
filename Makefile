# epcopy's entry points. `make test` works on a fresh Debian machine: it installs what the build needs,
# builds everything, and runs the whole suite.
SWIFT ?= swift

.PHONY: all deps build test bench-codec probe clean

all: build

deps:
	@scripts/install-deps

build: deps
	$(SWIFT) build

# Swift Testing only: the suite has no XCTest cases, and XCTest's empty summary would read as "no tests".
# --no-parallel: the QEMU suites each keep TCG guests busy; run side by side on 2 cores they stretched a
# destination's device-state load past 4 s and made timing-dependent checks flaky.
test: deps guest images
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --disable-xctest --no-parallel
	$(PYTHON_TESTS)

# One tier at a time (see Tests/Support/Tiers.swift): unit = pure Swift, seconds, no root; linux = real uffd,
# io_uring, sockets, processes and namespaces; qemu = real TCG guests (needs the built guest images).
PYTHON_TESTS = python3 -m unittest Workloads/bench/test_report.py Workloads/bench/test_faults.py Workloads/loadgen/test_sysbench_load.py \
	Workloads/loadgen/test_neighbour.py
test-unit: deps
	$(SWIFT) build --build-tests
	EPCOPY_TEST_TIER=unit $(SWIFT) test --skip-build --disable-xctest --no-parallel
	$(PYTHON_TESTS)
test-linux: deps
	$(SWIFT) build --build-tests
	EPCOPY_TEST_TIER=linux $(SWIFT) test --skip-build --disable-xctest --no-parallel
test-qemu: deps guest images
	$(SWIFT) build --build-tests
	EPCOPY_TEST_TIER=qemu $(SWIFT) test --skip-build --disable-xctest --no-parallel
.PHONY: test-unit test-linux test-qemu

# Benchmarks are programs, not tests: run in release mode and read the numbers.
bench-codec: deps
	$(SWIFT) run -c release epcopy bench codec

probe: deps
	$(SWIFT) run epcopy probe

clean:
	rm -rf .build

guest: agent numa-check
	@EPCOPY_AGENT=$(CURDIR)/$(AGENT_BIN) EPCOPY_NUMA_CHECK=$(CURDIR)/$(NUMA_CHECK_BIN) Workloads/guest/build.sh
.PHONY: guest

# The failure bench: real migrations with link cuts and daemon kills injected after the switch (FAULT_ARGS, e.g.
# "--cuts 100 --kills 40 --json"; see `epcopy bench faults --help`).
FAULT_ARGS ?= --cuts 4 --kills 2
bench-faults: deps guest
	$(SWIFT) build -c release
	.build/release/epcopy bench faults $(FAULT_ARGS)
.PHONY: bench-faults

# The main job: two namespaced hosts, one daemon each, the test guest migrated once in each mode.
demo: deps guest
	$(SWIFT) build -c release
	@scripts/demo
.PHONY: demo

# The same for a libvirt domain: one real libvirt daemon and one epcopy daemon per namespaced host, the test guest
# defined on host A and moved by `epcopy migrate --libvirt` once per mode (DEMO_LIBVIRT_MODES, DEMO_LIBVIRT_CHECK=1).
demo-libvirt: deps guest
	$(SWIFT) build -c release
	@scripts/demo-libvirt
.PHONY: demo-libvirt

# The demo's hosts and a VM, held for trying things by hand (it prints the commands); Ctrl-C tears them down.
demo-hosts: deps guest
	$(SWIFT) build -c release
	@DEMO_HOLD=1 scripts/demo
.PHONY: demo-hosts

# The in-guest agent as a static binary (glibc linked in, no Swift runtime needed in the guest). Its own build
# directory, so the flag does not force the host build to relink.
AGENT_BIN := .build/static/release/epcopy-agent
agent: deps
	$(SWIFT) build -c release --build-path .build/static --product epcopy-agent -Xswiftc -static-executable
.PHONY: agent

# The engine's NUMA placement as a static binary for a two-node test guest (Tests: NumaGuestTests), built the same way.
NUMA_CHECK_BIN := .build/static/release/epcopy-numa-check
numa-check: deps
	$(SWIFT) build -c release --build-path .build/static --product epcopy-numa-check -Xswiftc -static-executable
.PHONY: numa-check

# The benchmark guest (Debian bookworm + memcached + MariaDB + the agent), cached; see Workloads/images/README.md.
images: agent guest
	@EPCOPY_AGENT=$(CURDIR)/$(AGENT_BIN) Workloads/images/build.sh
.PHONY: images

# The workload benchmarks at one setting — memcached, then MySQL (MariaDB + sysbench oltp_read_write) — each in
# the three modes: results, tables and plots into docs/results/{memcached,mysql}. A 2 GiB guest that has used and
# freed 1.5 GiB before the workload starts (its free memory is dirty, as in a guest that has run for a while), a
# CPU-bound neighbour on the source host's CPU from 10 s, the migration at 20 s. Takes ~20 minutes on 2 cores.
# BENCH_ARGS adds or overrides harness options.
BENCH_SETTING = --guest-mem 2GiB --dirty-free-mb 1536 --contention cpu --duration 60 --contention-at 10 --migrate-at 20
bench: deps images
	$(SWIFT) build -c release
	.build/release/epcopy bench migrate --workload memcached $(BENCH_SETTING) --out docs/results/memcached $(BENCH_ARGS)
	.build/release/epcopy bench migrate --workload mysql $(BENCH_SETTING) --out docs/results/mysql $(BENCH_ARGS)
.PHONY: bench
