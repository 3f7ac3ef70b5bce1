include!("build-support/libtorch.rs");

fn main() {
    link_libtorch();
    // The target triple, for tests that ask Cargo about this platform's dependencies.
    println!(
        "cargo:rustc-env=KILN_HOST_TARGET={}",
        std::env::var("TARGET").expect("cargo sets TARGET for build scripts")
    );
}
