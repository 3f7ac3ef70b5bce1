include!("../build-support/libtorch.rs");

fn main() {
    link_libtorch();
}
