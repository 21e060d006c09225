//! The Docker side of the sandbox walkthrough: the `docker` CLI, the demo's
//! image (this host's python3, its standard library and the libraries `ldd`
//! names, imported as a root filesystem — no registry is involved), and the
//! network and container the walkthrough makes and removes.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest as _, Sha256};

/// The image of the vendor API stub and of the agents' sandboxes.
pub const IMAGE: &str = "bulkhead-demo-python:latest";
/// Bumped when what goes into the image changes.
const IMAGE_VERSION: &str = "1";
/// The label holding the image's build key (version and host python).
const IMAGE_LABEL: &str = "bulkhead.demo.image";
/// The label the demo puts on the network and container it makes.
pub const DEMO_LABEL: &str = "bulkhead.demo";
/// The sandbox-runner's label naming its instance, on every sandbox.
pub const LABEL_INSTANCE: &str = "bulkhead.runner.instance";
/// The sandbox-runner's label naming a sandbox's tenant.
pub const LABEL_TENANT: &str = "bulkhead.tenant";

/// Parts of the standard library the demo's programs never import.
const STDLIB_SKIP: &[&str] = &[
    "test",
    "site-packages",
    "dist-packages",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
];

/// Runs `docker args...`; its stdout.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("failed to run docker")?;
    ensure!(
        out.status.success(),
        "docker {}: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The engine's version when it answers.
pub fn engine_version() -> Option<String> {
    docker(&["version", "--format", "{{.Server.Version}}"])
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Where the python3 the demo's agents run is: its real path, its standard
/// library and its extension modules.
struct Python {
    exe: PathBuf,
    stdlib: PathBuf,
}

fn host_python(python: &Path) -> anyhow::Result<Python> {
    let out = Command::new(python)
        .args([
            "-I",
            "-c",
            "import os, sys, sysconfig; print(os.path.realpath(sys.executable)); \
             print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .with_context(|| format!("failed to run {}", python.display()))?;
    ensure!(out.status.success(), "{} failed", python.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(exe), Some(stdlib)) = (lines.next(), lines.next()) else {
        bail!("{} did not say where its library is", python.display());
    };
    Ok(Python {
        exe: exe.into(),
        stdlib: stdlib.into(),
    })
}

/// The build key: the image's version and the host python it is made of.
fn build_key(py: &Python) -> anyhow::Result<String> {
    let meta = std::fs::metadata(&py.exe)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = format!(
        "{IMAGE_VERSION} {} {} {mtime} {}",
        py.exe.display(),
        meta.len(),
        py.stdlib.display()
    );
    Ok(hex::encode(&Sha256::digest(id.as_bytes())[..8]))
}

/// Builds [`IMAGE`] unless a build of the same key is there; returns
/// whether it built. Serialized across processes by a file lock in the temp
/// dir, so that concurrent demos build it once; the tag moves to a new
/// build in one step (`docker import`).
pub fn ensure_image(python: &Path) -> anyhow::Result<bool> {
    let py = host_python(python)?;
    let key = build_key(&py)?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("bulkhead-demo-python-image.lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("failed to lock the image build: {e}"))?;
    let label = format!("{{{{index .Config.Labels \"{IMAGE_LABEL}\"}}}}");
    let old = docker(&["image", "inspect", "--format", &label, IMAGE]).ok();
    if old.as_deref().map(str::trim) == Some(key.as_str()) {
        return Ok(false);
    }
    let old_id = docker(&["image", "inspect", "--format", "{{.Id}}", IMAGE]).ok();
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-demo-image-")
        .tempdir()?;
    let root = dir.path().join("root");
    for d in ["usr/bin", "etc", "tmp", "proc", "dev", "sys"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::copy(&py.exe, root.join("usr/bin/python3"))?;
    let mut objects = vec![py.exe.clone()];
    copy_tree(&py.stdlib, &in_root(&root, &py.stdlib)?, &mut objects)?;
    for lib in shared_libraries(&objects)? {
        let dest = in_root(&root, &lib)?;
        if dest.exists() {
            continue;
        }
        std::fs::create_dir_all(dest.parent().context("a library without a directory")?)?;
        std::fs::copy(std::fs::canonicalize(&lib)?, &dest)
            .with_context(|| format!("failed to copy {}", lib.display()))?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(root.join("etc/group"), "nogroup:x:65534:\n")?;
    let tar = dir.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .context("failed to run tar")?;
    ensure!(status.success(), "tar failed");
    docker(&[
        "import",
        "--change",
        "ENV PATH=/usr/bin:/bin",
        "--change",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "--change",
        &format!("LABEL {IMAGE_LABEL}={key}"),
        tar.to_str().context("a temp path that is not UTF-8")?,
        IMAGE,
    ])?;
    if let Some(old) = old_id {
        // Untagged now; still in use by a container of another demo, it stays.
        let _ = docker(&["rmi", old.trim()]);
    }
    Ok(true)
}

/// `path` (absolute) under `root`.
fn in_root(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    Ok(root.join(path.strip_prefix("/").context("not an absolute path")?))
}

/// Copies the standard library (without [`STDLIB_SKIP`]), noting the
/// extension modules, whose libraries the image needs too.
fn copy_tree(from: &Path, to: &Path, objects: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let src = entry.path();
        let dest = to.join(&name);
        let meta = std::fs::metadata(&src);
        match meta {
            Ok(m) if m.is_dir() => {
                let n = name.to_string_lossy();
                if STDLIB_SKIP.contains(&n.as_ref()) || n.starts_with("config-") {
                    continue;
                }
                copy_tree(&src, &dest, objects)?;
            }
            Ok(m) if m.is_file() => {
                std::fs::copy(&src, &dest)?;
                if name.to_string_lossy().ends_with(".so") {
                    objects.push(src);
                }
            }
            // A dangling link or a special file: not needed.
            _ => {}
        }
    }
    Ok(())
}

/// The shared libraries (and the loader) `ldd` names for `objects`.
fn shared_libraries(objects: &[PathBuf]) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for chunk in objects.chunks(64) {
        let out = Command::new("ldd")
            .args(chunk)
            .output()
            .context("failed to run ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let lib = match words.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => path,
                [path, ..] if path.starts_with('/') && !path.ends_with(':') => path,
                _ => continue,
            };
            libs.insert(PathBuf::from(lib));
        }
    }
    ensure!(!libs.is_empty(), "ldd named no libraries");
    Ok(libs)
}

/// Ids and tenant labels of the containers of the runner `instance`.
pub fn sandboxes(instance: &str) -> anyhow::Result<Vec<(String, String)>> {
    let filter = format!("label={LABEL_INSTANCE}={instance}");
    let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL_TENANT}\"}}}}");
    let out = docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &filter,
        "--format",
        &format,
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (id, tenant) = l.split_once(' ')?;
            Some((id.to_owned(), tenant.trim().to_owned()))
        })
        .collect())
}

/// The daemon's directory of a container (`<DockerRootDir>/containers/<id>`).
pub fn container_dir(id: &str) -> anyhow::Result<PathBuf> {
    let root = docker(&["info", "--format", "{{.DockerRootDir}}"])?;
    Ok(Path::new(root.trim()).join("containers").join(id))
}

/// Every regular file under `dir`, concatenated with its name, and how many
/// files were read (the daemon's files of a container, taken while it runs).
pub fn read_files(dir: &Path) -> (String, usize) {
    let mut text = String::new();
    let mut count = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.is_file()
            && meta.len() < 64 << 20
            && let Ok(bytes) = std::fs::read(&path)
        {
            text.push_str(&format!("\n== {} ==\n", path.display()));
            text.push_str(&String::from_utf8_lossy(&bytes));
            count += 1;
        }
    }
    (text, count)
}

/// Removes a container (and its anonymous volumes); whether it was there
/// (`docker rm -f` succeeds for a missing one too).
pub fn remove_container(name: &str) -> bool {
    exists("container", name) && docker(&["rm", "-f", "-v", name]).is_ok()
}

/// Whether a `container` or `network` of that name exists.
pub fn exists(kind: &str, name: &str) -> bool {
    docker(&[kind, "inspect", "--format", "{{.Id}}", name]).is_ok()
}

/// Removes a network; whether it was there.
pub fn remove_network(name: &str) -> bool {
    docker(&["network", "rm", name]).is_ok()
}
