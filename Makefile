# vmmd: `make run` boots the demo guest, `make test` runs the whole suite.
# Both install what they need first: Debian packages (when missing), a .venv
# with the package and its test dependencies, and the firmware images.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# gcc/binutils/make build firmware/ and the layout probes; linux-libc-dev holds the
# kernel headers the layout test compares against; ovmf feeds the measurement
# interop test; python3-venv makes the .venv on Debian; qemu-utils (qemu-io) proves the image locks against QEMU's.
APT_PACKAGES := gcc binutils make libc6-dev linux-libc-dev ovmf python3-venv acpica-tools qemu-utils
BENCH_APT_PACKAGES := qemu-system-x86
TIMEOUT ?= 60
# Wait (up to 10 minutes) for another apt/dpkg to release its lock instead of failing at once: fresh cloud
# machines run unattended-upgrades at boot. apt-get install waits by itself (apt.conf(5), DPkg::Lock::Timeout);
# apt-get update does not wait for the lists lock, so apt_install retries it.
APT_OPTS := -o DPkg::Lock::Timeout=600


# A newer kernel's uapi headers, for the second run of the layout test (tests/test_layout.py, NEWER_HEADERS): what
# `make headers` (headers_install's processing) makes of Debian's linux-source-6.12 (bookworm-security), cached
# here. They hold the KVM_SEV_INIT2 ABI (struct kvm_sev_init, KVM_X86_*_VM, KVM_X86_GRP_SEV, KVM_CAP_VM_TYPES)
# that Debian 12's linux-libc-dev 6.1 lacks.
NEWER_UAPI_PACKAGE := linux-source-6.12
NEWER_UAPI := .cache/linux-uapi-6.12

# The Linux guest the Linux-boot test (tests/e2e/test_linux_boot.py), tests/hw and scripts/bench/linux_boot.py
# boot: Debian's cloud kernel and a busybox initramfs (scripts/linux-guest/), fetched with apt-get download and
# cached here, never committed. `make linux-guest` refreshes it when the cache is gone.
LINUX_GUEST := .cache/linux

.PHONY: all run test deps apt-deps bench-deps firmware lint bench clean install uninstall uapi-headers linux-guest

all: deps firmware

run: deps firmware
	$(VENV)/bin/vmctl run firmware/build/demo.bin --platform auto --timeout $(TIMEOUT)

test: deps firmware uapi-headers linux-guest
	$(VENV)/bin/ruff check vmmd tests scripts
	VMMD_STRICT_SKIPS=1 $(PY) -m pytest -q tests

lint: deps
	$(VENV)/bin/ruff check vmmd tests scripts

# Every benchmark runs; each exits 1 when it missed a goal and 2 when it could not measure (scripts/bench/
# common.py). The summary names them, and make bench fails if any did.
bench: deps firmware bench-deps linux-guest
	@failed=""; for b in scripts/bench/*.py "scripts/bench/net.py --mixed"; do \
	  case $$b in */common.py) continue;; esac; \
	  echo "== $$b"; $(PY) $$b; rc=$$?; \
	  case $$rc in 0) ;; 1) failed="$$failed\n  $$b: goal missed";; *) failed="$$failed\n  $$b: did not run (exit $$rc)";; esac; \
	done; \
	if [ -n "$$failed" ]; then printf "== bench summary: not every goal was met:$$failed\n" >&2; exit 1; fi; \
	echo "== bench summary: every goal met"

firmware:
	$(MAKE) -C firmware

# make install: vmmd for the systemd service, in FHS places (DESTDIR for staging). A virtual environment of its
# own under $(LIBDIR) (the package and its dependencies, not editable), vmmd and vmctl linked into $(BINDIR),
# the firmware images in $(DATADIR), the unit where systemd looks for local units, and the example definition
# in /etc/vmmd/vms/ unless a file of that name exists (a user's definitions are never overwritten). As root
# and without DESTDIR it also creates the system group vmmd the unit names. Then: systemctl daemon-reload;
# systemctl enable --now vmmd.
PREFIX ?= /usr/local
BINDIR := $(PREFIX)/bin
LIBDIR := $(PREFIX)/lib/vmmd
DATADIR := $(PREFIX)/share/vmmd
UNITDIR := $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
install: firmware | apt-deps
	[ -x $(DESTDIR)$(LIBDIR)/venv/bin/python ] || $(PYTHON) -m venv $(DESTDIR)$(LIBDIR)/venv
	$(DESTDIR)$(LIBDIR)/venv/bin/python -m pip install -q --upgrade pip
	$(DESTDIR)$(LIBDIR)/venv/bin/python -m pip install -q --upgrade --force-reinstall --no-deps .
	$(DESTDIR)$(LIBDIR)/venv/bin/python -m pip install -q .  # its dependencies, where missing
	$(DESTDIR)$(LIBDIR)/venv/bin/python -m compileall -q $(DESTDIR)$(LIBDIR)/venv/lib
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/vmmd/vms
	ln -sf $(LIBDIR)/venv/bin/vmmd $(DESTDIR)$(BINDIR)/vmmd
	ln -sf $(LIBDIR)/venv/bin/vmctl $(DESTDIR)$(BINDIR)/vmctl
	install -m 0644 firmware/build/*.bin $(DESTDIR)$(DATADIR)/
	sed 's|/usr/local/bin/vmmd|$(BINDIR)/vmmd|' scripts/systemd/vmmd.service > $(DESTDIR)$(UNITDIR)/vmmd.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/vmmd/vms/demo.toml ]; then \
	  echo "kept the existing $(DESTDIR)$(SYSCONFDIR)/vmmd/vms/demo.toml"; \
	else \
	  sed 's|^firmware = .*|firmware = "$(DATADIR)/demo.bin"|' examples/demo.toml \
	    > $(DESTDIR)$(SYSCONFDIR)/vmmd/vms/demo.toml; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ "$(SYSCONFDIR)" = /etc ] && [ "$$(id -u)" = 0 ] && ! getent group vmmd >/dev/null; then \
	  groupadd --system vmmd; fi
	@echo "installed: $(BINDIR)/vmmd, $(BINDIR)/vmctl, $(DATADIR)/*.bin, $(UNITDIR)/vmmd.service," \
	  "$(SYSCONFDIR)/vmmd/vms/demo.toml; start with: systemctl daemon-reload && systemctl enable --now vmmd"

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DATADIR)
	rm -f $(DESTDIR)$(BINDIR)/vmmd $(DESTDIR)$(BINDIR)/vmctl $(DESTDIR)$(UNITDIR)/vmmd.service
	@echo "kept $(SYSCONFDIR)/vmmd (your definitions) and the group vmmd"

uapi-headers: $(NEWER_UAPI)/include/linux/kvm.h

linux-guest: $(LINUX_GUEST)/initramfs.gz

$(LINUX_GUEST)/vmlinuz:
	scripts/linux-guest/fetch-kernel.sh $(LINUX_GUEST)

$(LINUX_GUEST)/initramfs.gz: $(LINUX_GUEST)/vmlinuz scripts/linux-guest/make_initramfs.py | deps
	$(PY) scripts/linux-guest/make_initramfs.py $(LINUX_GUEST)/busybox $(LINUX_GUEST)/modules $@

# apt-get download needs no root; an outdated package list (the candidate gone from the mirror) is refreshed
# first when we are root. Only the parts `make headers` reads are unpacked from the source tarball.
$(NEWER_UAPI)/include/linux/kvm.h:
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || \
	  { echo "the layout test needs $(NEWER_UAPI_PACKAGE) from Debian (apt-get download): run this on Debian 12" >&2; exit 1; }
	rm -rf $(NEWER_UAPI).tmp && mkdir -p $(NEWER_UAPI).tmp
	cd $(NEWER_UAPI).tmp && { apt-get download -q $(NEWER_UAPI_PACKAGE) 2>/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download -q $(NEWER_UAPI_PACKAGE); }; }
	dpkg-deb --fsys-tarfile $(NEWER_UAPI).tmp/$(NEWER_UAPI_PACKAGE)_*.deb | \
	  tar -xO ./usr/src/$(NEWER_UAPI_PACKAGE).tar.xz | \
	  tar -xJ -C $(NEWER_UAPI).tmp --wildcards '$(NEWER_UAPI_PACKAGE)/Makefile' '$(NEWER_UAPI_PACKAGE)/Kbuild' \
	    '$(NEWER_UAPI_PACKAGE)/Kconfig' '$(NEWER_UAPI_PACKAGE)/scripts/*' '$(NEWER_UAPI_PACKAGE)/include/uapi/*' \
	    '$(NEWER_UAPI_PACKAGE)/include/asm-generic/*' '$(NEWER_UAPI_PACKAGE)/arch/x86/*' \
	    '$(NEWER_UAPI_PACKAGE)/tools/include/*' '$(NEWER_UAPI_PACKAGE)/tools/arch/x86/*'
	$(MAKE) -s -C $(NEWER_UAPI).tmp/$(NEWER_UAPI_PACKAGE) ARCH=x86 headers
	mkdir -p $(NEWER_UAPI).tmp/out/include
	cd $(NEWER_UAPI).tmp/$(NEWER_UAPI_PACKAGE)/usr/include && find . -name '*.h' | tar -cf - -T - | \
	  tar -xf - -C $(CURDIR)/$(NEWER_UAPI).tmp/out/include
	rm -rf $(NEWER_UAPI) && mv $(NEWER_UAPI).tmp/out $(NEWER_UAPI) && rm -rf $(NEWER_UAPI).tmp

deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | apt-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m compileall -q vmmd  # bytecode caches, as pip makes for installed packages: faster vmctl start
	touch $@

# Install Debian packages only when one is missing; say how when not root.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    for try in $$(seq 120); do \
	      out=$$(DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTS) update -qq 2>&1) && break; \
	      case "$$out" in *"Could not get lock"*) [ $$try = 1 ] && echo "waiting for another apt to finish ..."; \
	        sleep 5;; *) echo "$$out" >&2; exit 1;; esac; \
	    done && \
	    DEBIAN_FRONTEND=noninteractive apt-get $(APT_OPTS) install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi
endef

apt-deps:
	$(call apt_install,$(APT_PACKAGES))

bench-deps:
	$(call apt_install,$(BENCH_APT_PACKAGES))

clean:
	$(MAKE) -C firmware clean
	rm -rf $(VENV) *.egg-info .pytest_cache .cache
