#!/usr/bin/env bash
# Compiler launcher for llamacpp_build.sh: if $LLAMACPP_PREBUILT holds the object this command would write
# (same build-relative path), copy it and write an empty depfile instead of compiling.
out= dep=; prev=
for a in "$@"; do
  [ "$prev" = -o ] && out=$a
  [ "$prev" = -MF ] && dep=$a
  prev=$a
done
if [ -n "$out" ] && [ -f "$LLAMACPP_PREBUILT/$out" ]; then
  cp "$LLAMACPP_PREBUILT/$out" "$out"
  [ -n "$dep" ] && echo "$out:" > "$dep"
  exit 0
fi
exec "$@"
