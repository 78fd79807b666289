#!/usr/bin/env bash
# Builds the CUDA 13.0 toolchain from PyPI wheels into .cuda-venv (git-ignored, about
# 1.2 GB) on a machine without a GPU, as ../shared/GPU.md describes, and prints the
# environment that `cargo build --features cuda` needs. Idempotent.
#   scripts/cuda-toolchain.sh            # set up, print the exports
#   eval "$(scripts/cuda-toolchain.sh)"  # set up and export into this shell
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cuda-venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
# CUDA 13.0 exactly (the target driver is 13.0). nvvm and crt are pinned: unpinned, nvcc
# pulls 13.5 ones whose PTX (.version 9.5) ptxas 13.0 rejects.
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 >&2
CU=$("$VENV/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
# The wheels ship versioned libraries only and no libcuda: the linker needs unversioned
# names and a stub libcuda.so whose SONAME is libcuda.so.1 (the driver provides the real one).
(cd "$CU/lib" && for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "lib$l.so"; done \
  && ln -sf libcurand.so.10 libcurand.so)
if [ ! -f "$CU/lib/stubs/libcuda.so" ]; then
  mkdir -p "$CU/lib/stubs"
  # On a fresh machine cudarc's sources are not in the registry yet: fetch them first.
  cargo fetch --quiet >&2
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | sort -V | tail -1)
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$SYS" | sort -u | sed 's/.*/void &(void){}/' >"$CU/lib/stubs/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/stub.c"
fi
cat <<VARS
export PATH=$CU/bin:\$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_HOME=$CU CUDA_COMPUTE_CAP=90
export LIBRARY_PATH=$CU/lib:$CU/lib/stubs:\${LIBRARY_PATH:-}
VARS
