//! Generates the tonic and prost code for `notify.v1`. Uses the vendored protoc, so a machine
//! needs nothing but cargo, unless `PROTOC` names another one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => std::path::PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // prost's codec, with a bound on repeated fields checked before decoding.
        .codec_path("crate::codec::BoundedCodec")
        .file_descriptor_set_path(out_dir.join("notify_descriptor.bin"))
        .compile_with_config(prost_config, &["notify/v1/notifier.proto"], &["."])?;
    println!("cargo:rerun-if-changed=notify/v1/notifier.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
