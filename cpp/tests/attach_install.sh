#!/bin/sh
# The C example in docs/attach.md builds against an installed tree with one include and one
# pkg-config line, then attaches to livemig's side (test_attach minimal_example runs it).
# Usage: attach_install.sh BUILD_DIR TEST_ATTACH SOURCE_DIR. Exit 77 (skipped) without pkg-config or cc.
set -eu
build=$1 test_attach=$2 src=$3
command -v pkg-config >/dev/null 2>&1 || { echo "SKIP: no pkg-config"; exit 77; }
command -v cc >/dev/null 2>&1 || { echo "SKIP: no cc"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
pc=$(find "$tmp/prefix" -name livemig_attach.pc)
test -n "$pc"
PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_PATH
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror "$src/cpp/attach/examples/minimal.c" $(pkg-config --cflags --libs livemig_attach) \
   -o "$tmp/minimal"
echo "built with: cc minimal.c $(pkg-config --cflags --libs livemig_attach)"
LIVEMIG_MINIMAL="$tmp/minimal" "$test_attach" minimal_example
