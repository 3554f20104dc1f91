#!/usr/bin/env bash
# Stops the services up.sh started and deletes their data; stops both even if one fails.
set -euo pipefail
here="$(dirname "$0")"
rc=0
"$here/cassandra.sh" stop || rc=1
"$here/redis.sh" stop || rc=1
exit "$rc"
