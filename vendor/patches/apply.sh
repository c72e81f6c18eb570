#!/usr/bin/env bash
# Rebuilds a vendored crate from its crates.io release and the numbered patches in
# vendor/patches/<crate>/, into DEST (which must not exist):
#
#     vendor/patches/apply.sh candle-core DEST
#     vendor/patches/apply.sh mistralrs-core DEST
#
# The release is fetched from crates.io (or taken from cargo's download cache) and checked
# against the SHA-256 below before anything is applied. Each patch applies alone, in order, so
# that one can be read, sent upstream or dropped without the others.
set -euo pipefail
crate=$1
dest=$2
here=$(cd "$(dirname "$0")" && pwd)
case $crate in
  candle-core) version=0.10.2; sha=6bd9895436c1ba5dc1037a19935d084b838db066ff4e15ef7dded020b7c12a4a ;;
  mistralrs-core) version=0.8.1; sha=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4 ;;
  *) echo "apply.sh: no patch series for '$crate'" >&2; exit 2 ;;
esac
[ -e "$dest" ] && { echo "apply.sh: $dest exists" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
file="$crate-$version.crate"
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$file" 2>/dev/null | head -1 || true)
if [ -n "$cached" ]; then
  cp "$cached" "$work/$file"
elif command -v curl >/dev/null 2>&1; then
  curl -sSfL --retry 3 -o "$work/$file" "https://static.crates.io/crates/$crate/$file"
else
  python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
    "https://static.crates.io/crates/$crate/$file" "$work/$file"
fi
echo "$sha  $work/$file" | sha256sum -c --quiet -
tar xzf "$work/$file" -C "$work"
src="$work/$crate-$version"
# Packaging files, and what the vendored copy leaves out (patch 0001 of candle-core).
rm -rf "$src/.cargo_vcs_info.json" "$src/Cargo.lock" "$src/Cargo.toml.orig"
if [ "$crate" = candle-core ]; then
  rm -rf "$src/tests" "$src/examples" "$src/benches"
fi
for p in "$here/$crate"/*.patch; do
  # Outside any git work tree, so that paths are the crate's own.
  (cd "$src" && git apply --whitespace=nowarn "$p") || { echo "apply.sh: $(basename "$p") does not apply" >&2; exit 1; }
done
mv "$src" "$dest"
