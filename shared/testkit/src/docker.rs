//! The Docker engine for sandbox tests: whether it answers (skipping loudly,
//! or failing under `BULKHEAD_REQUIRE_EXTERNAL=1`), the `docker` CLI, and the
//! test agent image, built locally because no registry is reachable.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

use crate::external::Missing;

/// The image sandbox tests run: this host's `sh`, coreutils and the
/// libraries they need, nothing else.
pub const TEST_IMAGE: &str = "bulkhead-test-agent:latest";
/// Bumped when the image's content changes, so that an older build is
/// replaced (every test crate builds it through [`ensure_test_image`]).
const TEST_IMAGE_VERSION: &str = "2";
/// The label holding [`TEST_IMAGE_VERSION`].
const VERSION_LABEL: &str = "bulkhead.test.image";

/// Whether the Docker engine answers; `Ok(false)` after a `SKIP:` line when
/// it does not, an error under `BULKHEAD_REQUIRE_EXTERNAL=1`.
pub fn docker_or_skip() -> anyhow::Result<bool> {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(true);
    }
    let skipped: Option<()> =
        Missing::new("docker engine", "install docker.io and start dockerd").skip()?;
    Ok(skipped.is_some())
}

/// Runs `docker args...`; its stdout.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("failed to run docker")?;
    ensure!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds [`TEST_IMAGE`] once: idempotent, and serialized across test
/// processes (of every crate) by a file lock in the temp dir. It is a
/// `docker import` of a root filesystem made of this host's programs and the
/// libraries `ldd` names; no registry is involved.
pub fn ensure_test_image() -> anyhow::Result<()> {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return Ok(());
    }
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("bulkhead-test-agent.lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock: {e}"))?;
    let label = format!("{{{{index .Config.Labels \"{VERSION_LABEL}\"}}}}");
    if docker(&["image", "inspect", "--format", &label, TEST_IMAGE])
        .is_ok_and(|v| v.trim() == TEST_IMAGE_VERSION)
    {
        *built = true;
        return Ok(());
    }
    // An older build of the image, replaced below.
    let old = docker(&["image", "inspect", "--format", "{{.Id}}", TEST_IMAGE]).ok();
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-test-image-")
        .tempdir()?;
    let root = dir.path().join("root");
    for d in ["usr/bin", "tmp", "proc", "dev", "sys", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let programs = [
        "sh", "env", "cat", "base64", "sleep", "grep", "id", "ls", "echo", "true",
    ];
    let mut libs = std::collections::BTreeSet::new();
    for p in programs {
        let path = host_program(p)?;
        let real = std::fs::canonicalize(&path)?;
        std::fs::copy(&real, root.join("usr/bin").join(p))?;
        let ldd = Command::new("ldd").arg(&real).output()?;
        for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
            if word.starts_with('/') {
                libs.insert(PathBuf::from(word));
            }
        }
    }
    for lib in libs {
        let rel = lib.strip_prefix("/")?;
        let dest = root.join(rel);
        std::fs::create_dir_all(dest.parent().context("lib parent")?)?;
        std::fs::copy(std::fs::canonicalize(&lib)?, &dest)?;
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin"))?;
    // As in any image: the daemon copies the mode of /tmp onto the tmpfs.
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let tar = dir.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar failed");
    docker(&[
        "import",
        "--change",
        "ENV PATH=/usr/bin:/bin",
        "--change",
        &format!("LABEL {VERSION_LABEL}={TEST_IMAGE_VERSION}"),
        tar.to_str().context("path")?,
        TEST_IMAGE,
    ])?;
    if let Some(old) = old {
        let _ = docker(&["rmi", old.trim()]);
    }
    *built = true;
    Ok(())
}

fn host_program(p: &str) -> anyhow::Result<PathBuf> {
    for d in ["/usr/bin", "/bin"] {
        let path = Path::new(d).join(p);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("{p} not found on this host")
}
