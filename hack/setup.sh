#!/usr/bin/env bash
# Installs everything mailrelay needs on a fresh Debian machine: system
# packages (SMTP peers, Postfix for benchmarks, Lua for the Argo CD checks,
# rspamd and OpenDKIM as real milters for the tests, the public-suffix list
# for DMARC, dnsmasq's binary for the README tour's DNS server: dnsmasq-base,
# which starts no system service; iptables and nftables for the test of the
# cluster scripts' netfilter cleanup, in a network namespace of its own),
# a virtualenv in .venv with the project and its dev tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(swaks libnet-ssleay-perl postfix lua5.4 shellcheck openssl ca-certificates iproute2 procps
  rspamd opendkim opendkim-tools publicsuffix dnsmasq-base iptables nftables)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Postfix must not ask questions nor start a system instance: the tests and
  # benchmarks run their own instances with their own main.cf.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests start their own rspamd and OpenDKIM (tests/mrtest/realmilters.py):
  # the system services the packages may have started are not wanted.
  if [[ " ${missing[*]} " == *" rspamd "* || " ${missing[*]} " == *" opendkim "* ]] \
    && systemctl is-system-running >/dev/null 2>&1; then
    $SUDO systemctl disable --now rspamd opendkim >/dev/null 2>&1 || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -L .venv ]; then
  # A copy sharing another checkout's .venv (the README tour test): installing
  # here would point that venv at this copy. The owner's setup.sh installs.
  [ -f "$stamp" ] || echo "setup: .venv is shared and was set up for another pyproject.toml" >&2
elif [ ! -f "$stamp" ]; then
  echo "setup: installing mailrelay and its dev tools into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/mailrelay)"
