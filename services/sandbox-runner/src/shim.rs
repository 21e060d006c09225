//! The init shim (`shim/init.c`, built by `build.rs`): a small static program
//! that is every sandbox's entrypoint. The runner installs it under its data
//! directory (mode 0555) and mounts it read-only into each container; it
//! reads the credential frame from stdin, puts the values into its
//! environment and execs the agent, so that no value is ever in a container's
//! configuration, on its command line or in a file.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The shim, as built for this host.
pub const SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bulkhead-init"));

/// Where the shim is mounted inside a container.
pub const CONTAINER_PATH: &str = "/.bulkhead-init";

/// The file name under the runner's shim directory.
pub const FILE_NAME: &str = "bulkhead-init";

/// Installs the shim in `dir` (made if missing) unless the same bytes are
/// already there; returns its path. A changed shim replaces the old one by
/// rename, so running sandboxes keep the file they started with.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(FILE_NAME);
    if let Ok(existing) = std::fs::read(&path)
        && existing == SHIM
        && std::fs::metadata(&path)?.permissions().mode() & 0o777 == 0o555
    {
        return Ok(path);
    }
    let tmp = dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(SHIM)?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Encodes the credential frame the shim reads: `BHI1`, the body's length
/// (u32, big-endian), then per entry the key and the value, each preceded by
/// its length; then `trailer` (the payload, which the agent reads after the
/// shim has taken its frame). Holds values, so it is zeroized when dropped,
/// and sized up front: a growing vector would leave copies behind in the
/// allocations it outgrew.
pub fn frame<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone,
    trailer: &[u8],
) -> Zeroizing<Vec<u8>> {
    let body: usize = entries
        .clone()
        .into_iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(8 + body + trailer.len()));
    out.extend_from_slice(b"BHI1");
    out.extend_from_slice(&len32(body).to_be_bytes());
    for (k, v) in entries {
        out.extend_from_slice(&len32(k.len()).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&len32(v.len()).to_be_bytes());
        out.extend_from_slice(v);
    }
    out.extend_from_slice(trailer);
    out
}

fn len32(n: usize) -> u32 {
    // Bounded long before: values are at most 64 KiB, frames a few MiB.
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn the_frame_layout() {
        let f = frame([("A", &b"xy"[..])], b"p");
        assert_eq!(
            f.as_slice(),
            b"BHI1\0\0\0\x0b\0\0\0\x01A\0\0\0\x02xyp".as_slice()
        );
        assert_eq!(f.capacity(), f.len(), "sized up front");
    }

    /// The real shim, on this host: the values reach the program's
    /// environment, the payload its stdin, and nothing reaches its argv.
    #[test]
    fn the_shim_sets_the_environment_and_passes_the_payload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shim = install(dir.path()).expect("install");
        assert_eq!(
            std::fs::metadata(&shim).expect("meta").permissions().mode() & 0o777,
            0o555
        );
        // Installing again keeps the file.
        assert_eq!(install(dir.path()).expect("again"), shim);
        let mut child = Command::new(&shim)
            .args(["sh", "-c", "echo \"K=$K\"; echo \"E=$E\"; cat"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let input = frame([("K", &b"v a=l\nue"[..]), ("E", &b""[..])], b"the payload");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&input)
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "K=v a=l\nue\nE=\nthe payload"
        );
    }

    /// A core dump of the agent (or of the shim holding the frame) would
    /// write its environment, the credentials, to a file: into the process
    /// sandbox's directory on the host, or through a `core_pattern` pipe
    /// (systemd-coredump, apport) onto the host's disk. The shim sets the
    /// core limit to zero, soft and hard, so the agent cannot raise it.
    #[test]
    fn the_agent_cannot_dump_core() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shim = install(dir.path()).expect("install");
        let mut child = Command::new(&shim)
            .args([
                "sh",
                "-c",
                "ulimit -c -H; ulimit -c; ulimit -c unlimited 2>/dev/null || echo refused",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let input = frame([("K", &b"v"[..])], b"");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&input)
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n0\nrefused\n");
    }

    #[test]
    fn the_shim_refuses_a_bad_frame() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shim = install(dir.path()).expect("install");
        for input in [
            &b"XXXX\0\0\0\0"[..],
            &b"BHI1\0\0\0\x09\0\0\0\x011"[..],
            &b"BH"[..],
        ] {
            let mut child = Command::new(&shim)
                .args(["true"])
                .env("PATH", "/usr/bin:/bin")
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input)
                .expect("write");
            let out = child.wait_with_output().expect("wait");
            assert_eq!(out.status.code(), Some(125), "{input:?}");
        }
    }
}
