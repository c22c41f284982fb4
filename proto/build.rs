//! Compiles proto/sci/v1/sci.proto (the wire format) and
//! proto/perftools/profiles/profile.proto (pprof) and
//! proto/externalscaler/externalscaler.proto (KEDA's external scaler) with
//! protox (pure Rust): no system protoc.
use anyhow::Context;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        [
            "sci/v1/sci.proto",
            "perftools/profiles/profile.proto",
            "externalscaler/externalscaler.proto",
        ],
        ["proto"],
    )
    .context("compiling the .proto files")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps: a window encodes to the same bytes every time, so its
        // SHA-256 digest tells a replay from a different window with the same key.
        .btree_map(".")
        .compile_fds(descriptors)
        .context("generating Rust code")?;
    Ok(())
}
