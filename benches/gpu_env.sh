# Sourced by the GPU-machine scripts of benches/. `unpack [XZ [BIN]]` unpacks the packed
# CUDA binary (device/arenaflow.xz, from scripts/build-cuda.sh) to BIN
# (device/bin/arenaflow) once, and points LD_LIBRARY_PATH at PyTorch's CUDA 13 libraries and
# NCCL.
# `arenaflow_bin` unpacks the staged binary ($stash/arenaflow.xz, from gpu_recipe.sh stage)
# if there is one, else the carried device/arenaflow.xz, and sets $bin to it.
# `smollm2` puts the SmolLM2 GGUF, staged in three parts (benches/gpu_recipe.sh stage),
# together at $SMOLLM2.

# The system's temporary folder on the GPU machine: it outlives one call while the machine
# stays warm.
stash=$(dirname "$(mktemp -u)")/arenaflow-gpu
SMOLLM2=.models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
unpack() {
  local xz=${1:-device/arenaflow.xz} bin=${2:-device/bin/arenaflow}
  if [ ! -x "$bin" ]; then
    mkdir -p "$(dirname "$bin")"
    # Into a file of this process, then renamed: runs started side by side may unpack at once.
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$xz" "$bin.$$"
    chmod +x "$bin.$$"
    mv "$bin.$$" "$bin"
  fi
  LIB=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
  # NCCL (nvidia-nccl-cu13), which data-parallel training opens at run time.
  NCCL=$(python3 -c 'import nvidia, glob, os; print(os.path.dirname((glob.glob(os.path.join(list(nvidia.__path__)[0], "**", "libnccl.so*"), recursive=True) or ["/"])[0]))')
  export LD_LIBRARY_PATH=$LIB:$NCCL:${LD_LIBRARY_PATH:-}
}

arenaflow_bin() {
  if [ -f "$stash/arenaflow.xz" ]; then
    unpack "$stash/arenaflow.xz" "$stash/bin/arenaflow"
    bin=$stash/bin/arenaflow
  else
    unpack
    bin=device/bin/arenaflow
  fi
}

smollm2() {
  mkdir -p "$(dirname "$SMOLLM2")"
  # Through a file of this process, renamed: a run beside this one may be reading the model.
  cat "$stash"/gguf.a? > "$SMOLLM2.$$"
  mv "$SMOLLM2.$$" "$SMOLLM2"
}
