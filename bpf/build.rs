//! Compiles the eBPF frame walker (C, CO-RE) with clang and generates its skeleton.
use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"))
        .join("walker.skel.rs");
    SkeletonBuilder::new()
        .source("src/bpf/walker.bpf.c")
        .clang_args(["-I", "src/bpf", "-O2", "-Wall"])
        .build_and_generate(&out)
        .expect("compiling src/bpf/walker.bpf.c (needs clang: apt-get install clang)");
    println!("cargo:rerun-if-changed=src/bpf");
}
