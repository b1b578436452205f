#!/bin/sh
# Unpacks offline text corpora from Debian packages (no root needed) into
# ${SPECDEC_CACHE:-~/.cache/specdec_jax}/corpora/<package>/, where training
# configs find them as {corpora}/<package>/...
#   sh tools/fetch_corpora.sh                      # python3.11-doc (reST prose)
#   sh tools/fetch_corpora.sh fortunes jargon-text # others
set -e
dest="${SPECDEC_CACHE:-$HOME/.cache/specdec_jax}/corpora"
[ $# -gt 0 ] || set -- python3.11-doc
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest"
for pkg in "$@"; do
  if [ -d "$dest/$pkg" ]; then echo "$pkg: already in $dest/$pkg"; continue; fi
  (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "error: cannot download $pkg" >&2; exit 1; }
  dpkg -x "$tmp"/"$pkg"_*.deb "$tmp/$pkg"
  mv "$tmp/$pkg" "$dest/$pkg"
  rm -f "$tmp"/"$pkg"_*.deb
  echo "$pkg: unpacked into $dest/$pkg"
done
