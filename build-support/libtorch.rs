// Shared by the build scripts of the `kiln` binary and of `kiln-worker` (through `include!`):
// links libtorch so that one binary runs on CPU-only machines and uses a GPU where present.
//
// torch-sys hands its direct dependents the directory of the libtorch it linked
// (`DEP_TCH_LIBTORCH_LIB`).
// - `libtorch_cuda` is linked with `--no-as-needed`: nothing in Kiln references one of its
//   symbols directly, so the linker would otherwise drop it and CUDA would stay invisible.
// - an rpath to that directory lets the binaries and tests find libtorch at run time without
//   LD_LIBRARY_PATH. NCCL needs none: Kiln finds the wheel's libnccl.so.2 itself (see
//   worker/src/collective/nccl/library.rs).
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    if dir.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:rustc-link-arg=-Wl,-L{},--no-as-needed,-ltorch_cuda,--as-needed",
            dir.display()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
}
