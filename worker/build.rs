include!("../build-support/libtorch.rs");

fn main() {
    link_libtorch();
    compile_shim();
}

/// Compiles `cpp/kiln_torch.cpp` (autocast with an explicit dtype, the libtorch build
/// description) against the headers of the libtorch torch-sys linked: `DEP_TCH_LIBTORCH_LIB`
/// is its `lib/` directory, the headers are in the `include/` beside it.
fn compile_shim() {
    println!("cargo:rerun-if-changed=cpp/kiln_torch.cpp");
    let lib = std::path::PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports the libtorch it linked"),
    );
    let include = lib.join("../include");
    // torch-sys reads the same variable; libtorch 2.x wheels use the C++11 ABI.
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("cpp/kiln_torch.cpp")
        .compile("kiln_torch");
}
