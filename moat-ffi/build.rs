//! Gives libmoat.so a versioned SONAME, so that programs linked against one
//! release load only a compatible one: `libmoat.so.MAJOR`, and while the
//! major version is 0 (where a minor release may break the ABI, as Cargo
//! reads semver) `libmoat.so.0.MINOR`. See docs/c-and-go.md.

// A build script talks to Cargo on stdout.
#![allow(clippy::print_stdout)]

fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" || target_os.ends_with("bsd") {
        let major = env!("CARGO_PKG_VERSION_MAJOR");
        let minor = env!("CARGO_PKG_VERSION_MINOR");
        let soname = if major == "0" {
            format!("libmoat.so.0.{minor}")
        } else {
            format!("libmoat.so.{major}")
        };
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
