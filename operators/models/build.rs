//! With the `cuda` feature, compiles each kernel source (kernels/*.cu, one per op) to PTX for
//! the GPU generation in CUDA_COMPUTE_CAP (default 90: H100/H200) with the nvcc on PATH
//! (scripts/cuda-toolchain.sh provides one on machines without a GPU).

/// The kernel sources, one per op; `src/cuda.rs` loads each as a module of that name.
const KERNELS: [&str; 9] = [
    "attention",
    "dropout",
    "attention_backward",
    "rope",
    "rms_norm",
    "gated",
    "optim",
    "lora",
    "gptq",
];

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for kernel in KERNELS {
        let source = format!("kernels/{kernel}.cu");
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(out.join(format!("{kernel}.ptx")))
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("cannot run nvcc (see scripts/cuda-toolchain.sh): {e}"));
        assert!(status.success(), "nvcc failed on {source}");
    }
}
