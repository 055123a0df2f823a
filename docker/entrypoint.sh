#!/bin/sh
# Container entry point. With no arguments, or options only, it serves Wyoming on port 10200 of every interface,
# with the data folder /data (a volume: server.yaml, voices.yaml, voices/, cache/, made from the defaults on first
# start); options are added to `serve` (docker run IMAGE --zeroconf; compose: command: ["--zeroconf"]).
# A command instead runs that wyoming-cosyvoice command on the same data folder, e.g.
#   docker run --rm -v wyoming-cosyvoice-data:/data IMAGE voices add alice /data/alice.wav --transcript "..."
# With WYOMING_COSYVOICE_WEB_TOKEN set (8+ characters), serving also opens the voice studio on port 10201 of every
# interface (publish it as -p 127.0.0.1:10201:10201); every change on the page needs that token.
set -e
if [ -n "${WYOMING_COSYVOICE_WEB_TOKEN:-}" ]; then
  case "${1:-}" in "" | -*) set -- --web --web-host 0.0.0.0 "$@" ;; esac
fi
case "${1:-}" in
  "" | -*) exec wyoming-cosyvoice serve --uri tcp://0.0.0.0:10200 --data-dir /data "$@" ;;
  *) exec wyoming-cosyvoice "$@" ;;
esac
