#!/usr/bin/env bash
# Checks that each vendored crate is exactly its crates.io release with the patch series of
# vendor/patches/ applied: a change made to vendor/ without a patch (or a patch without the
# change) fails here, in CI. Prints one line per crate.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
for crate in candle-core mistralrs-core; do
  out=$(mktemp -d)
  "$root/vendor/patches/apply.sh" "$crate" "$out/$crate"
  if ! diff -r "$out/$crate" "$root/vendor/$crate" >"$out/diff"; then
    echo "vendor/$crate differs from its release plus vendor/patches/$crate:" >&2
    head -40 "$out/diff" >&2
    exit 1
  fi
  echo "vendor/$crate: release + $(ls "$root/vendor/patches/$crate" | wc -l) patches, identical"
  rm -rf "$out"
done
