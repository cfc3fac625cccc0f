# gpujobd — every target does what CI does; see README.md.
#   make demo      boot the sandbox, install gpujobd, show it at work
#   make test      unit tests on this host, integration tests in the sandbox
#   make install   install from this checkout (DESTDIR, PREFIX honoured)

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
PYTHON ?= /usr/bin/python3
LIBDIR = $(PREFIX)/lib/gpujobd
BINDIR = $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
DBUSPOLICYDIR ?= $(SYSCONFDIR)/dbus-1/system.d
VENV = .venv
SANDBOX = $(PYTHON) tests/sandbox/sandbox.py
APT_PACKAGES = systemd dbus util-linux passwd procps python3 python3-venv python3-gi \
	python3-pydbus python3-pystemd python3-structlog

.PHONY: deps venv test unit integration integration-host demo install uninstall lint clean

deps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }

$(VENV)/.stamp: pyproject.toml | deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/python -m ruff check gpujobd tests $(wildcard benchmarks)

unit: venv
	$(VENV)/bin/python -m pytest -q tests/unit tests/host

integration: venv
	$(SANDBOX) run -- $(VENV)/bin/python -m pytest -q tests/integration

# Against this host's own systemd: only when explicitly asked (it installs gpujobd on this host).
integration-host: venv
	@test "$$GPUJOBD_TEST_HOST_SYSTEMD" = 1 || { echo "set GPUJOBD_TEST_HOST_SYSTEMD=1 to test against this host's systemd"; exit 2; }
	@test "$$(cat /proc/1/comm)" = systemd || { echo "PID 1 is not systemd here: use make integration"; exit 2; }
	$(VENV)/bin/python -m pytest -q tests/integration

test: lint unit integration

demo: venv
	$(SANDBOX) run -- sh tests/demo.sh

install:
	install -d $(DESTDIR)$(LIBDIR)/gpujobd $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(DBUSPOLICYDIR) $(DESTDIR)$(SYSCONFDIR)/gpujobd
	install -m 0644 gpujobd/*.py gpujobd/py.typed $(DESTDIR)$(LIBDIR)/gpujobd/
	for tool in gpujobd:gpujobd.daemon gpujobctl:gpujobd.cli; do \
		name=$${tool%%:*}; module=$${tool#*:}; \
		printf '#!%s -I\nimport sys\nsys.path.insert(0, "%s")\nfrom %s import main\nsys.exit(main())\n' \
			"$(PYTHON)" "$(LIBDIR)" "$$module" > $(DESTDIR)$(BINDIR)/$$name; \
		chmod 0755 $(DESTDIR)$(BINDIR)/$$name; \
	done
	sed 's|@BINDIR@|$(BINDIR)|g' units/gpujobd.service > $(DESTDIR)$(UNITDIR)/gpujobd.service
	install -m 0644 units/gpujob.slice $(DESTDIR)$(UNITDIR)/gpujob.slice
	install -m 0644 units/org.gpujobd1.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.gpujobd1.conf
	test -e $(DESTDIR)$(SYSCONFDIR)/gpujobd/gpujobd.toml || \
		install -m 0644 packaging/gpujobd.toml $(DESTDIR)$(SYSCONFDIR)/gpujobd/gpujobd.toml
	@echo "installed; now: systemctl reload dbus; systemctl daemon-reload; systemctl enable --now gpujobd"

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(BINDIR)/gpujobd $(DESTDIR)$(BINDIR)/gpujobctl \
		$(DESTDIR)$(UNITDIR)/gpujobd.service $(DESTDIR)$(UNITDIR)/gpujob.slice \
		$(DESTDIR)$(DBUSPOLICYDIR)/org.gpujobd1.conf

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
