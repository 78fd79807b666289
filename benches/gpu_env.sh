# Sourced by the GPU-machine scripts of benches/. `unpack [XZ [BIN]]` unpacks the packed
# CUDA binary (device/arenaflow.xz, from scripts/build-cuda.sh) to BIN
# (device/bin/arenaflow) once, and points LD_LIBRARY_PATH at PyTorch's CUDA 13 libraries.
unpack() {
  local xz=${1:-device/arenaflow.xz} bin=${2:-device/bin/arenaflow}
  if [ ! -x "$bin" ]; then
    mkdir -p "$(dirname "$bin")"
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$xz" "$bin"
    chmod +x "$bin"
  fi
  LIB=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
  export LD_LIBRARY_PATH=$LIB:${LD_LIBRARY_PATH:-}
}
