//! Generates the tonic/prost code for `moemesh.v1`, with a vendored protoc so
//! that no manual install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let protos = [
        "proto/moemesh/v1/tensor.proto",
        "proto/moemesh/v1/router.proto",
        "proto/moemesh/v1/expert.proto",
        "proto/moemesh/v1/coordinator.proto",
    ];
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("moemesh_descriptor.bin");
    tonic_prost_build::configure()
        // Served by gRPC reflection, so grpcurl needs no .proto files.
        .file_descriptor_set_path(descriptors)
        // Tensor payloads decode into `bytes::Bytes`, sharing the receive buffer.
        .bytes(".moemesh.v1")
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
