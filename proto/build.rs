//! Compiles `proto/` with protox (pure Rust, no `protoc` binary) and generates tonic/prost code,
//! plus the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/proofmesh/v1/proofmesh.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true);
    compiler.open_files(files)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("proofmesh_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    // Witness-vector chunks are `Bytes`: sliced from one buffer on send, no copy on receive.
    tonic_prost_build::configure()
        .bytes(".proofmesh.v1.WitnessVectorChunk.data")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
