#!/bin/sh
# Install linejudge like an appliance (run as root from a clone: `sudo make install-appliance`).
#
#   PREFIX (default /opt/linejudge)   the code and an edge-only venv (no torch): PREFIX/.venv
#   ROLE   (default appliance)        appliance: the inspection service and its sync timer;
#                                     hq: the HQ server (its venv adds the training and hq extras)
#   ENABLE (default yes)              enable and start the units (only where systemd runs)
#
# Creates the system users the units run as (linejudge, in groups video and render, or
# linejudge-hq), /etc/linejudge/ with the example config (an existing one is kept) and
# /var/lib/linejudge*, installs the units into /etc/systemd/system. Every Python package comes
# at the version in requirements.lock.
set -eu

PREFIX=${PREFIX:-/opt/linejudge}
ROLE=${ROLE:-appliance}
ENABLE=${ENABLE:-yes}
PY=${PY:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)

say() { printf 'linejudge install: %s\n' "$*"; }
die() { printf 'linejudge install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make install-appliance), it creates users and writes to $PREFIX and /etc"
case "$ROLE" in
  appliance) EXTRAS="edge,demo"; USER_NAME=linejudge; UNITS="appliance.service appliance-sync.service appliance-sync.timer" ;;
  hq) EXTRAS="edge,train,hq"; USER_NAME=linejudge-hq; UNITS="hq.service" ;;
  *) die "ROLE must be appliance or hq, not '$ROLE'" ;;
esac

say "code -> $PREFIX"
mkdir -p "$PREFIX"
if [ "$SRC" != "$(cd "$PREFIX" && pwd)" ]; then
  (cd "$SRC" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --no-recursion -cf -) \
    | tar -xf - -C "$PREFIX"
fi

say "edge venv ($EXTRAS) -> $PREFIX/.venv"
[ -x "$PREFIX/.venv/bin/python" ] || "$PY" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install --quiet -c "$PREFIX/requirements.lock" --upgrade pip
if [ "$ROLE" = hq ]; then
  "$PREFIX/.venv/bin/pip" install --quiet -c "$PREFIX/requirements.lock" torch==2.13.0
fi
"$PREFIX/.venv/bin/pip" install --quiet -c "$PREFIX/requirements.lock" --build-constraint "$PREFIX/requirements.lock" \
  -e "$PREFIX[$EXTRAS]"          # editable: the code, bundles and keys stay under PREFIX

say "system user $USER_NAME"
id -u "$USER_NAME" >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin "$USER_NAME"
if [ "$ROLE" = appliance ]; then
  for group in video render; do
    getent group "$group" >/dev/null || groupadd --system "$group"
    usermod -a -G "$group" "$USER_NAME"
  done
fi

say "config and state"
mkdir -p /etc/linejudge
if [ "$ROLE" = appliance ] && [ ! -e /etc/linejudge/appliance.yaml ]; then
  cp "$PREFIX/systemd/appliance.example.yaml" /etc/linejudge/appliance.yaml
  say "wrote /etc/linejudge/appliance.yaml from the example: set source, line and operator_pins"
fi
if [ -e /etc/linejudge/appliance.yaml ]; then      # it holds the operators' PINs
  chown root:linejudge /etc/linejudge/appliance.yaml 2>/dev/null || true
  chmod 0640 /etc/linejudge/appliance.yaml
fi
STATE=/var/lib/$USER_NAME
mkdir -p "$STATE" && chown "$USER_NAME:$USER_NAME" "$STATE" && chmod 0750 "$STATE"

say "units -> /etc/systemd/system: $UNITS"
for unit in $UNITS; do cp "$PREFIX/systemd/$unit" /etc/systemd/system/; done
if [ "$ENABLE" = yes ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  case "$ROLE" in
    appliance) systemctl enable --now appliance.service ;;
    hq) systemctl enable --now hq.service ;;
  esac
  say "enabled; follow it with: journalctl -fu ${ROLE}.service"
else
  say "systemd is not running here (or ENABLE=no): start it later with 'systemctl enable --now ${ROLE}.service'"
fi
if [ "$ROLE" = appliance ]; then
  say "done. The demo without a camera: $PREFIX/.venv/bin/linejudge demo --state-dir $STATE/demo"
else
  say "done. Register an appliance: $PREFIX/.venv/bin/linejudge hq add-appliance --state-dir $STATE --appliance <name>"
fi
