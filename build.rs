//! Generates the gRPC code and the file-descriptor set that reflection serves.
//! `protoc` is vendored (unless `PROTOC` names one), so a machine with only the Rust
//! toolchain builds this crate.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/rolecheck/v1/rolecheck.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=PROTOC");

    let protoc = match env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("rolecheck_descriptor.bin"))
        .codec_path("crate::codec::StrictCodec")
        .compile_with_config(config, &[proto], &["proto"])?;
    Ok(())
}
