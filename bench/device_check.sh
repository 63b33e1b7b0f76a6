#!/usr/bin/env bash
# Kept because the team's session brief runs `bench/device_check.sh $OUT`; the script is tools/device_check.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../tools/device_check.sh" "$@"
