# gpujobd — every target does what CI does; see README.md.
#   make demo      boot the sandbox, install gpujobd, show it at work
#   make test      lint, unit tests on this host, integration, chaos and package tests in the sandbox
#   make wheels    build gpujobd's wheel from this checkout and fetch the pinned nvidia-ml-py wheel
#   make install   install those wheels (DESTDIR, PREFIX honoured; no network, no git needed)

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
PYTHON ?= /usr/bin/python3
LIBDIR = $(PREFIX)/lib/gpujobd
BINDIR = $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
DBUSPOLICYDIR ?= $(SYSCONFDIR)/dbus-1/system.d
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
# The system Python's site directory for PREFIX (Debian: /usr/local/lib/python3.X/dist-packages).
SITEDIR ?= $(shell $(PYTHON) -c 'import sys, sysconfig; print(next((p for p in sys.path if p.startswith("$(PREFIX)/lib/python") and p.endswith("-packages")), sysconfig.get_path("purelib", vars={"base": "$(PREFIX)"})))')
VENV = .venv
SANDBOX = $(PYTHON) tests/sandbox/sandbox.py
APT_PACKAGES = gcc libc6-dev systemd dbus util-linux passwd procps python3 python3-venv python3-gi \
	python3-pydbus python3-pystemd python3-structlog python3-jeepney

.PHONY: deps venv native wheels test unit bus integration chaos integration-host demo install uninstall lint \
	lint-style lint-imports lint-types clean

deps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }

$(VENV)/.stamp: pyproject.toml | deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

# ruff; the import rules of pyproject.toml's [tool.importlinter] (tests/lint holds a contract type of
# ours); mypy over gpujobd/ with the strictness stated in [tool.mypy]. `make -k lint` runs all three.
lint: lint-style lint-imports lint-types

lint-style: venv
	$(VENV)/bin/python -m ruff check gpujobd tests $(wildcard benchmarks)

lint-imports: venv
	$(VENV)/bin/lint-imports --no-cache --no-logo

lint-types: venv
	$(VENV)/bin/python -m mypy

unit: venv native
	GPUJOBD_REQUIRE_PROGRAM=1 $(VENV)/bin/python -m pytest -q tests/unit tests/host

# The real D-Bus service and client on a private dbus-daemon the tests start (no systemd): ~1 s.
bus: venv
	$(VENV)/bin/python -m pytest -q tests/bus

integration: venv wheels
	$(SANDBOX) run -- $(VENV)/bin/python -m pytest -q tests/integration

# Against this host's own systemd: only when explicitly asked (it installs gpujobd on this host).
integration-host: venv wheels
	@test "$$GPUJOBD_TEST_HOST_SYSTEMD" = 1 || { echo "set GPUJOBD_TEST_HOST_SYSTEMD=1 to test against this host's systemd"; exit 2; }
	@test "$$(cat /proc/1/comm)" = systemd || { echo "PID 1 is not systemd here: use make integration"; exit 2; }
	$(VENV)/bin/python -m pytest -q tests/integration

# Issue 15's attacks, one case each, and the kill -9 crash loop at scale; prints its seed and figures.
chaos: venv wheels
	$(SANDBOX) run -- $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/chaos

test: lint unit bus integration chaos package-test bench-check

demo: venv wheels
	$(SANDBOX) run -- sh tests/demo.sh

# ---- wheels, then install ----------------------------------------------------------------------
# `make install` runs where PyPI and git may be out of reach (inside the test sandbox, whose
# checkout has no git metadata), so it only installs what `make wheels` prepared in build/wheels/:
# gpujobd's wheel, built from a copy of the working tree, and NVIDIA's nvidia-ml-py (module
# pynvml), pinned and hash-checked (packaging/nvidia-ml-py.txt). gpujobd goes into LIBDIR, which a
# gpujobd.pth in the system Python's site directory for PREFIX puts on every script's sys.path
# (`import gpujobd.client` works in the system python3); nvidia-ml-py into LIBDIR/private, which
# only the daemon's wrapper adds. The wrappers put LIBDIR first on sys.path.
PKG_VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
WHEELS = build/wheels
CLIENT_WHEELS = $(WHEELS)/client
WHEEL_SRC = build/wheel-src/gpujobd-$(PKG_VERSION)
GPUJOBD_WHEEL = $(WHEELS)/gpujobd-$(PKG_VERSION)-py3-none-any.whl
NVML_PY_PIN = packaging/nvidia-ml-py.txt
NVML_PY_VERSION := $(shell sed -n 's/^nvidia-ml-py==\([^ ]*\) .*/\1/p' $(NVML_PY_PIN))
NVML_PY_SHA256 := $(shell sed -n 's/^nvidia-ml-py==.*--hash=sha256:\([0-9a-f]*\).*/\1/p' $(NVML_PY_PIN))
NVML_PY_WHEEL = $(WHEELS)/nvidia_ml_py-$(NVML_PY_VERSION)-py3-none-any.whl
PIP = $(VENV)/bin/pip --disable-pip-version-check --no-input

# The compiled supervisor (gpujobd/native/supervisor.c): built here, on the build machine, never by
# pip (the wheel stays pure Python: `pip install gpujobd` is the client, for any virtualenv). `make
# install` copies it into the installed package; an in-tree copy serves the venv's zygote and tests.
NATIVE = build/native/gpujob-supervisor
NATIVE_CFLAGS = -O2 -g -Wall -Wextra -Wshadow -Wformat=2 -Werror=format-security -D_FORTIFY_SOURCE=2 \
	-fstack-protector-strong -fPIE
NATIVE_LDFLAGS = -pie -Wl,-z,relro,-z,now
CC ?= cc

$(NATIVE): gpujobd/native/supervisor.c
	mkdir -p $(dir $@)
	$(CC) $(NATIVE_CFLAGS) -o $@ $< $(NATIVE_LDFLAGS) -lpthread -lm

gpujobd/native/gpujob-supervisor: $(NATIVE)
	cp $< $@

native: $(NATIVE) gpujobd/native/gpujob-supervisor

wheels: venv native $(NVML_PY_WHEEL) $(CLIENT_WHEELS)/.stamp
	$(call export_tree,$(WHEEL_SRC))
	rm -f $(WHEELS)/gpujobd-*.whl
	$(PIP) wheel -q --no-deps -w $(WHEELS) $(WHEEL_SRC)
	@test -f $(GPUJOBD_WHEEL) || { echo "make wheels: pip built no $(GPUJOBD_WHEEL)" >&2; exit 1; }

# The client's own dependency (jeepney), pinned, for tests that pip-install the client into a fresh
# virtualenv inside the sandbox, which has no network (tests/integration/test_client_venv.py).
$(CLIENT_WHEELS)/.stamp: packaging/client-wheels.txt | venv
	mkdir -p $(CLIENT_WHEELS)
	$(PIP) download -q --no-deps --only-binary=:all: --require-hashes -r packaging/client-wheels.txt \
		-d $(CLIENT_WHEELS)
	touch $@

$(NVML_PY_WHEEL): $(NVML_PY_PIN) | venv
	mkdir -p $(WHEELS)
	$(PIP) download -q --no-deps --only-binary=:all: --require-hashes -r $(NVML_PY_PIN) -d $(WHEELS)
	touch $@

install:
	@for wheel in $(GPUJOBD_WHEEL) $(NVML_PY_WHEEL); do test -f $$wheel || { echo "make install: \
	$$wheel is missing: run \`make wheels\` first (it builds gpujobd's wheel from this checkout and fetches \
	the pinned nvidia-ml-py from PyPI)" >&2; exit 2; }; done
	@test -x $(VENV)/bin/pip || { echo "make install: no $(VENV)/bin/pip: run \`make wheels\` first" >&2; exit 2; }
	@echo "$(NVML_PY_SHA256)  $(NVML_PY_WHEEL)" | sha256sum --check --quiet - || { echo "make install: \
	$(NVML_PY_WHEEL) is not the wheel pinned in $(NVML_PY_PIN): remove it and run \`make wheels\`" >&2; exit 2; }
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DBUSPOLICYDIR) $(DESTDIR)$(SYSCONFDIR)/gpujobd
	rm -rf $(DESTDIR)$(LIBDIR)
	$(PIP) install -q --no-deps --no-index --no-compile --no-cache-dir --root-user-action=ignore \
		--target $(DESTDIR)$(LIBDIR) $(GPUJOBD_WHEEL)
	$(PIP) install -q --no-deps --no-index --no-compile --no-cache-dir --root-user-action=ignore \
		--target $(DESTDIR)$(LIBDIR)/private $(NVML_PY_WHEEL)
	rm -rf $(DESTDIR)$(LIBDIR)/bin $(DESTDIR)$(LIBDIR)/private/bin  # the wrappers below replace them
	@test -x $(NATIVE) || { echo "make install: $(NATIVE) is missing: run \`make wheels\` first" >&2; exit 2; }
	install -D -m 0755 $(NATIVE) $(DESTDIR)$(LIBDIR)/gpujobd/native/gpujob-supervisor
	# Byte-compiled here, as dh_python3 and the RPM's brp-python-bytecompile do for the packages:
	# a user cannot write __pycache__ into LIBDIR, so without this every gpujobctl run compiled the
	# modules the root daemon never imports (cli.*, client.*), ~15 ms a run. -d names the installed
	# path in tracebacks, not the DESTDIR staging one.
	$(PYTHON) -m compileall -q -d $(LIBDIR) $(DESTDIR)$(LIBDIR)
	for tool in gpujobd:gpujobd.daemon.main:main:$(LIBDIR)/private gpujobctl:gpujobd.cli.main:run:; do \
		name=$${tool%%:*}; rest=$${tool#*:}; module=$${rest%%:*}; rest=$${rest#*:}; \
		entry=$${rest%%:*}; private=$${rest#*:}; \
		printf '#!%s -I\nimport sys\nsys.path[:0] = [p for p in ("%s", "%s") if p]\nfrom %s import %s\nsys.exit(%s())\n' \
			"$(PYTHON)" "$(LIBDIR)" "$$private" "$$module" "$$entry" "$$entry" > $(DESTDIR)$(BINDIR)/$$name; \
		chmod 0755 $(DESTDIR)$(BINDIR)/$$name; \
	done
	install -d $(DESTDIR)$(SITEDIR) && echo "$(LIBDIR)" > $(DESTDIR)$(SITEDIR)/gpujobd.pth
	install -D -m 0644 packaging/completion/gpujobctl.bash $(DESTDIR)$(BASHCOMPDIR)/gpujobctl
	install -D -m 0644 packaging/completion/_gpujobctl $(DESTDIR)$(ZSHCOMPDIR)/_gpujobctl
	sed 's|@BINDIR@|$(BINDIR)|g' units/gpujobd.service > $(DESTDIR)$(UNITDIR)/gpujobd.service
	install -m 0644 units/gpujob.slice $(DESTDIR)$(UNITDIR)/gpujob.slice
	install -m 0644 units/org.gpujobd1.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.gpujobd1.conf
	test -e $(DESTDIR)$(SYSCONFDIR)/gpujobd/gpujobd.toml || \
		install -m 0644 packaging/gpujobd.toml $(DESTDIR)$(SYSCONFDIR)/gpujobd/gpujobd.toml
	@echo "installed; now: systemctl reload dbus; systemctl daemon-reload; systemctl enable --now gpujobd"

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(BINDIR)/gpujobd $(DESTDIR)$(BINDIR)/gpujobctl \
		$(DESTDIR)$(UNITDIR)/gpujobd.service $(DESTDIR)$(UNITDIR)/gpujob.slice \
		$(DESTDIR)$(DBUSPOLICYDIR)/org.gpujobd1.conf $(DESTDIR)$(SITEDIR)/gpujobd.pth \
		$(DESTDIR)$(BASHCOMPDIR)/gpujobctl $(DESTDIR)$(ZSHCOMPDIR)/_gpujobctl

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache

# ---- distribution packages (docs/install.md) ---------------------------------------------------
#   make deb            dist/gpujobd_<version>-<rev>_<arch>.deb (dpkg-buildpackage; lintian)
#   make rpm            dist/gpujobd-<version>-1.<arch>.rpm (rpmbuild; rpmlint)
#   make package-test   install, upgrade, remove and purge the .deb in the sandbox, as an admin would
# Both build from a copy of the working tree (the files git tracks or would track) under build/.
DEB_VERSION_SUFFIX ?=
DEB_BUILD_ROOT = build/deb$(DEB_VERSION_SUFFIX)
DEB_SRC = $(DEB_BUILD_ROOT)/gpujobd-$(PKG_VERSION)
RPM_TOPDIR = $(CURDIR)/build/rpm
# Packages are built with the distribution's own tools and python3, whatever else is on PATH (pyenv).
PKG_PATH = /usr/sbin:/usr/bin:/sbin:/bin
# Copy the working tree's files (tracked, or untracked and not ignored; deleted ones skipped) to $(1).
define export_tree
	rm -rf $(1) && mkdir -p $(1)
	git ls-files -z --cached --others --exclude-standard \
		| $(PYTHON) -c 'import os, sys; sys.stdout.buffer.write(b"".join(p + b"\0" for p in sys.stdin.buffer.read().split(b"\0") if p and os.path.lexists(p)))' \
		| tar --null --files-from=- -cf - | tar -xf - -C $(1)
endef

.PHONY: deb rpm package-test

DEB_ARCH = $(shell dpkg --print-architecture 2>/dev/null)
RPM_ARCH = $(shell rpm --eval '%{_arch}' 2>/dev/null || uname -m)

deb:
	$(call export_tree,$(DEB_SRC))
	cp -r packaging/debian $(DEB_SRC)/debian
	cd $(DEB_SRC) && upstream=$$(dpkg-parsechangelog -S Version | sed 's/-[^-]*$$//') && \
		test "$$upstream" = "$(PKG_VERSION)" || { echo "packaging/debian/changelog is at $$upstream, pyproject.toml at $(PKG_VERSION): add a changelog entry"; exit 1; }
	@if [ -n "$(DEB_VERSION_SUFFIX)" ]; then cd $(DEB_SRC) && \
		top=$$(dpkg-parsechangelog -S Version) && dist=$$(dpkg-parsechangelog -S Distribution) && \
		who=$$(dpkg-parsechangelog -S Maintainer) && \
		{ printf 'gpujobd (%s%s) %s; urgency=medium\n\n  * Local rebuild (DEB_VERSION_SUFFIX=%s).\n\n -- %s  %s\n\n' \
			"$$top" "$(DEB_VERSION_SUFFIX)" "$$dist" "$(DEB_VERSION_SUFFIX)" "$$who" "$$(date -R)"; \
		  cat debian/changelog; } > debian/changelog.new && mv debian/changelog.new debian/changelog && \
		echo "build version: $$(dpkg-parsechangelog -S Version)"; fi
	@dpkg -s dpkg-dev lintian >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev lintian; }
	cd $(DEB_SRC) && { dpkg-checkbuilddeps >/dev/null 2>&1 || \
		DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq . || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq .; }; }
	cd $(DEB_SRC) && env PATH=$(PKG_PATH) dpkg-buildpackage -us -uc -b
	mkdir -p dist
	cd $(DEB_SRC) && deb=../gpujobd_$$(dpkg-parsechangelog -S Version | sed 's/^[0-9]*://')_$(DEB_ARCH).deb && \
		cp $$deb $(CURDIR)/dist/ && env PATH=$(PKG_PATH) lintian --display-info $$deb

# A second .deb of the same code at a higher version is what the test upgrades to.
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' packaging/debian/changelog)
PKG_TEST_SUFFIX = +pkgtest1

package-test: venv wheels
	$(MAKE) deb
	$(MAKE) deb DEB_VERSION_SUFFIX=$(PKG_TEST_SUFFIX)
	$(MAKE) rpm
	GPUJOBD_DEB=dist/gpujobd_$(DEB_VERSION)_$(DEB_ARCH).deb \
	GPUJOBD_DEB_UPGRADE=dist/gpujobd_$(DEB_VERSION)$(PKG_TEST_SUFFIX)_$(DEB_ARCH).deb \
		$(SANDBOX) run -- $(VENV)/bin/python -m pytest -q tests/packaging

# On a builder without Fedora's pyproject-rpm-macros and systemd-rpm-macros (Debian), stand-ins
# for them are loaded from packaging/rpm/macros.debian-builder; rpmbuild --nodeps there, since
# the build dependencies are Debian packages that rpm's database does not know.
RPM_DEB_BUILD_DEPS = rpm rpmlint python3-build python3-installer python3-wheel python3-setuptools \
	python3-pytest python3-gi python3-pydbus python3-pystemd python3-structlog
RPM_SRC = build/rpm/src/gpujobd-$(PKG_VERSION)

# The RPM bundles the pinned nvidia-ml-py wheel (its Source1): make rpm hands rpmbuild the one
# `make wheels` fetched; the spec's %prep checks its sha256.
RPM_SPEC = packaging/rpm/gpujobd.spec
rpm: $(NVML_PY_WHEEL)
	@if [ -f /etc/debian_version ]; then dpkg -s $(RPM_DEB_BUILD_DEPS) >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(RPM_DEB_BUILD_DEPS); }; fi
	@spec=$$(sed -n 's/^Version: *//p' $(RPM_SPEC)); test "$$spec" = "$(PKG_VERSION)" || { \
		echo "$(RPM_SPEC) is at $$spec, pyproject.toml at $(PKG_VERSION)"; exit 1; }
	@pin=$$(sed -n 's/^%global nvml_py_version *//p; s/^%global nvml_py_sha256 *//p' $(RPM_SPEC) | tr '\n' ' '); \
		test "$$pin" = "$(NVML_PY_VERSION) $(NVML_PY_SHA256) " || { echo "$(RPM_SPEC) pins nvidia-ml-py \
	$$pin; $(NVML_PY_PIN) pins $(NVML_PY_VERSION) $(NVML_PY_SHA256): make them agree"; exit 1; }
	$(call export_tree,$(RPM_SRC))
	rm -rf $(RPM_TOPDIR)/RPMS && mkdir -p $(RPM_TOPDIR)/SOURCES dist
	cp $(NVML_PY_WHEEL) $(RPM_TOPDIR)/SOURCES/
	tar -C $(dir $(RPM_SRC)) --owner=0 --group=0 --sort=name -czf $(RPM_TOPDIR)/SOURCES/gpujobd-$(PKG_VERSION).tar.gz gpujobd-$(PKG_VERSION)
	if [ -n "$$(rpm --eval '%{?pyproject_wheel:1}%{?systemd_post:1}')" ]; then \
		env PATH=$(PKG_PATH) rpmbuild -bb --define "_topdir $(RPM_TOPDIR)" $(RPM_SPEC); \
	else \
		env PATH=$(PKG_PATH) rpmbuild -bb --define "_topdir $(RPM_TOPDIR)" --nodeps \
			--load=$(CURDIR)/packaging/rpm/macros.debian-builder \
			--define "_gpujobd_rpm_dir $(CURDIR)/packaging/rpm" $(RPM_SPEC); \
	fi
	cp $(RPM_TOPDIR)/RPMS/$(RPM_ARCH)/gpujobd-$(PKG_VERSION)-*.$(RPM_ARCH).rpm dist/
	env PATH=$(PKG_PATH) rpmlint -c packaging/rpm/rpmlint.toml -r packaging/rpm/gpujobd.rpmlintrc $(RPM_SPEC) $(RPM_TOPDIR)/RPMS/$(RPM_ARCH)/gpujobd-$(PKG_VERSION)-*.$(RPM_ARCH).rpm

# ---- benchmarks (docs/performance.md) ----------------------------------------------------------
#   make bench           every section, in the sandbox: prints one table, writes
#                        benchmarks/results/<date>-<host>.json and renders docs/performance.md from it
#   make bench QUICK=1   a few runs each (under 2 minutes): <date>-<host>-quick.json, docs untouched
#   BENCH_OUT=DIR        write the JSON there instead (inside the checkout: the sandbox sees only it)
# Against this host's systemd instead (it installs gpujobd here): GPUJOBD_BENCH_HOST_SYSTEMD=1, and
# PID 1 must be systemd. task-spooler (tsp) is a peer: installed here, so the sandbox sees it too.
BENCH_APT_PACKAGES = task-spooler gcc
BENCH_RESULTS = $(or $(BENCH_OUT),benchmarks/results)
BENCH_ARGS = $(if $(QUICK),--quick) --out $(BENCH_RESULTS)

.PHONY: bench bench-deps bench-report bench-check

# The benchmarks' quick mode, run end to end by a test (no timing is asserted): part of `make test`.
bench-check: venv
	$(VENV)/bin/python -m pytest -q tests/bench

bench-deps: deps
	@dpkg -s $(BENCH_APT_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_APT_PACKAGES); }

bench: venv bench-deps wheels
	@if [ "$$GPUJOBD_BENCH_HOST_SYSTEMD" = 1 ]; then \
		test "$$(cat /proc/1/comm)" = systemd || { echo "PID 1 is not systemd here: unset GPUJOBD_BENCH_HOST_SYSTEMD to use the sandbox"; exit 2; }; \
		$(VENV)/bin/python -m benchmarks $(BENCH_ARGS); \
	else \
		$(SANDBOX) run -- $(VENV)/bin/python -m benchmarks $(BENCH_ARGS); \
	fi
	$(if $(QUICK),,$(VENV)/bin/python -m benchmarks.report --results $(BENCH_RESULTS))

bench-report: venv
	$(VENV)/bin/python -m benchmarks.report --results $(BENCH_RESULTS)
