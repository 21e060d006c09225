//! Builds the init shim (`shim/init.c`) into a small static binary that the
//! runner embeds and mounts into every sandbox. It is C, not Rust, so that it
//! is tiny, static without a musl target, and reads exactly the credential
//! frame from stdin without buffering a byte of the payload behind it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("shim/init.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=BULKHEAD_SHIM_CC");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("bulkhead-init");
    let cc = std::env::var("BULKHEAD_SHIM_CC").unwrap_or_else(|_| "gcc".to_owned());
    let status = Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the sandbox init shim with `{cc} -static` failed ({s}): a C compiler with a static libc is required (Debian: gcc and libc6-dev)"
        ),
        Err(e) => panic!(
            "cannot run `{cc}` to build the sandbox init shim ({e}): install gcc (Debian: gcc and libc6-dev) or set BULKHEAD_SHIM_CC"
        ),
    }
}
