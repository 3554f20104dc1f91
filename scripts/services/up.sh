#!/usr/bin/env bash
# Starts the services the tests need: Redis, then Cassandra (for the Scylla store).
# Tests find them through two variables, which scripts/test.sh sets by itself:
#   CHATPROOF_TEST_CQL=127.0.0.1:19042          (CHATPROOF_CASSANDRA_PORT)
#   CHATPROOF_TEST_REDIS=redis://127.0.0.1:16379/  (CHATPROOF_REDIS_PORT)
# To run cargo test by hand against services from this script, set both, e.g.
#   CHATPROOF_TEST_CQL=127.0.0.1:19042 CHATPROOF_TEST_REDIS=redis://127.0.0.1:16379/ cargo test
# or run CHATPROOF_TEST_SERVICES=external scripts/test.sh with them set. Stop with down.sh.
set -euo pipefail
here="$(dirname "$0")"
redis_url="$("$here/redis.sh" start)"
cql_addr="$("$here/cassandra.sh" start)"
echo "CHATPROOF_TEST_CQL=$cql_addr"
echo "CHATPROOF_TEST_REDIS=$redis_url"
