#!/usr/bin/env bash
# Install the Debian packages the tests need, listed one per line in .ci/system-packages.txt
# (blank lines and '#' comments ignored). Called by `make setup` (hence `make test`, `make demo`)
# and by .ci/run. Quiet: one apt-get update, one install, only for packages missing here.
# Without root or apt-get it installs nothing and prints one line: what is missing, which tests
# will fail, and the command that installs them. Exit status 0 either way (the tests then say why).
set -uo pipefail
cd "$(dirname "$0")/.."
list=.ci/system-packages.txt
[ -f "$list" ] || exit 0
missing=()
while IFS= read -r line; do
  pkg="${line%%#*}"; pkg="$(echo "$pkg" | tr -d '[:space:]')"
  [ -n "$pkg" ] || continue
  # dpkg-query: installed means status "install ok installed"
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$pkg")
  fi
done < "$list"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") \
      >/tmp/emphy-apt.log 2>&1; then
    echo "installed system packages: ${missing[*]}"
    exit 0
  fi
  echo "note: could not install ${missing[*]} (see /tmp/emphy-apt.log); tests that need them will fail" >&2
  exit 0
fi
echo "note: missing system packages ${missing[*]} (the report's browser test and others that need them will fail);" \
     "install with: sudo apt-get install -y ${missing[*]}" >&2
exit 0
