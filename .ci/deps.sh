#!/usr/bin/env bash
# The crate edges of DESIGN.md and issue 10, checked with cargo tree: engine -> operators ->
# operators/models, engine -> udfs; the models free of DataFusion, Arrow, Parquet and tokio;
# udfs free of candle and of every arenaflow crate; nothing depends on the engine.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
deps() { cargo tree -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u; }
forbid() {
  local crate=$1 pattern=$2 why=$3 hits
  hits=$(deps "$crate" | grep -vx "$crate" | grep -E "$pattern" | tr '\n' ' ' || true)
  if [ -n "$hits" ]; then echo "crate edges: $crate depends on $hits($why)"; fail=1; fi
}
forbid arenaflow-models '^(datafusion|arrow|parquet|tokio|object_store|arenaflow-)' 'the models crate holds no DataFusion, Arrow or tokio and imports no other arenaflow crate'
forbid arenaflow-udfs '^(candle|arenaflow-)' 'SQL functions depend on no model code and no arenaflow crate'
forbid arenaflow-operators '^arenaflow-(engine|udfs)$' 'operators sit below the engine'
for crate in arenaflow-operators arenaflow-models arenaflow-udfs; do
  forbid "$crate" '^arenaflow-engine$' 'nothing depends on the engine'
done
# Not grep -q: it exits at the first match, cargo tree then dies of SIGPIPE and pipefail
# reads that as a missing edge.
deps arenaflow-operators | grep -x arenaflow-models >/dev/null || { echo "crate edges: arenaflow-operators does not depend on arenaflow-models"; fail=1; }
[ "$fail" = 0 ] && echo "crate edges: ok (engine -> operators -> models, engine -> udfs)"
exit "$fail"
