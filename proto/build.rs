//! Generates the gRPC types and services from `proto/kiln.proto` with a pure-Rust protobuf
//! compiler (protox): building Kiln needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(["kiln.proto"], ["proto"])?;
    // Undecodable bytes are the caller's error: `crate::codec` answers INVALID_ARGUMENT.
    tonic_prost_build::configure()
        .codec_path("crate::codec::KilnCodec")
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto/kiln.proto");
    Ok(())
}
