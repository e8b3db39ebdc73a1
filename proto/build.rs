//! Compiles `distill/v1/*.proto` and the Open Inference Protocol (`inference/`) with protox
//! (pure Rust), so building needs no system `protoc`.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "distill/v1/tensor.proto",
        "distill/v1/teacher.proto",
        "distill/v1/coordinator.proto",
        "distill/v1/registry.proto",
        "inference/open_inference_grpc.proto",
    ];
    let includes = ["."];
    let fds = protox::compile(protos, includes)?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // tonic-reflection serves this descriptor set; compile_fds does not write it itself.
    std::fs::write(
        out.join("distill_descriptor.bin"),
        protox::prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".distill.v1.Tensor.data")
        .bytes(".distill.v1.EvalResult.checkpoint_bytes")
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .type_attribute(".", "#[allow(clippy::all)]")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=distill");
    println!("cargo:rerun-if-changed=inference");
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
