#!/usr/bin/env bash
# CI: a real PACS for tests/test_pacs_orthanc.py: Orthanc (the PACS) and dicom3tools (dciodvfy), and DCMTK
# (storescu, storescp, echoscu, dsrdump) for tests/test_dcmtk.py, from Debian.
# Idempotent: does nothing when both are installed. The test starts its own Orthanc from its own
# configuration on free loopback ports; the system service the package installs is not used (and is
# stopped where systemd runs it). Without these packages the test skips.
set -euo pipefail
PKGS=(orthanc dicom3tools dcmtk)

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

missing=()
for p in "${PKGS[@]}"; do
    command -v dpkg-query >/dev/null && installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "pacs.sh: no apt-get (not Debian/Ubuntu): install ${missing[*]} another way" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    policy="$(apt-cache policy "${missing[@]}")"
    echo "$policy"
    if echo "$policy" | grep -q "Candidate: (none)"; then
        echo "pacs.sh: no installation candidate for one of: ${missing[*]}" >&2
        exit 1
    fi
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true  # the test runs its own Orthanc
    fi
fi

ORTHANC="$(PATH="$PATH:/usr/sbin:/usr/local/sbin" command -v Orthanc)"
"$ORTHANC" --version >/dev/null  # runs
/usr/bin/dsrdump --version >/dev/null  # DCMTK's (pynetdicom has commands named storescu/storescp too)
echo "pacs.sh: orthanc $(dpkg-query -W -f='${Version}' orthanc) ($ORTHANC)," \
     "dicom3tools $(dpkg-query -W -f='${Version}' dicom3tools) ($(command -v dciodvfy))," \
     "dcmtk $(dpkg-query -W -f='${Version}' dcmtk)"
