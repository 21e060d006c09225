//! The credential-leak scan: canary secrets, made in memory, searched as
//! they are and base64-encoded in process memory (`/proc/<pid>/mem`) and
//! environments, files and directories, and texts such as `docker inspect`
//! output or an audit export.
//!
//! Every canary starts with [`PREFIX`], whose length is a multiple of three,
//! so that the base64 forms of all canaries share a prefix too: the scan
//! looks for the two prefixes and compares whole canaries only there, which
//! keeps a scan of a few hundred MiB quick in a debug build.

use std::fmt;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use zeroize::Zeroizing;

/// The common start of every canary (12 bytes: base64 keeps it aligned).
pub const PREFIX: &str = "bulkhead-cn-";
const RANDOM_CHARS: usize = 24;
/// Files larger than this are read only up to it.
const MAX_FILE: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

/// A secret value planted to be searched for.
pub struct Canary {
    /// What it stands for, e.g. `mercy-clinic/ehr EHR_API_TOKEN`.
    pub label: String,
    pub value: Zeroizing<String>,
}

impl fmt::Debug for Canary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Canary")
            .field("label", &self.label)
            .field("value", &"[redacted]")
            .finish()
    }
}

impl Canary {
    /// A fresh random canary, made in memory.
    pub fn new(label: impl Into<String>) -> Self {
        use rand::Rng as _;
        use rand::distr::Alphanumeric;
        let mut value = Zeroizing::new(String::with_capacity(PREFIX.len() + RANDOM_CHARS));
        value.push_str(PREFIX);
        let mut rng = rand::rng();
        for _ in 0..RANDOM_CHARS {
            value.push(char::from(rng.sample(Alphanumeric)));
        }
        Self {
            label: label.into(),
            value,
        }
    }
}

/// Where to look.
#[derive(Debug, Clone)]
pub enum Target {
    /// The readable mappings of a live process.
    Memory { name: String, pid: u32 },
    /// A live process's environment.
    Environ { name: String, pid: u32 },
    /// Every regular file under a directory (or one file).
    Files { name: String, path: PathBuf },
    /// Files under a directory modified since a time (temp dirs shared with
    /// other programs).
    FilesSince {
        name: String,
        path: PathBuf,
        since: SystemTime,
    },
    /// A text in hand (an audit export, `docker inspect` output).
    Text { name: String, text: String },
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Memory { name, .. }
            | Target::Environ { name, .. }
            | Target::Files { name, .. }
            | Target::FilesSince { name, .. }
            | Target::Text { name, .. } => name,
        }
    }
}

/// One canary found somewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub canary: String,
    /// `raw` or `base64`.
    pub form: &'static str,
    pub target: String,
    /// The file, or the process mapping, it was found in.
    pub place: String,
}

/// What a scan looked at and found.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Targets scanned, with the bytes read from each.
    pub scanned: Vec<(String, u64)>,
    /// Targets or parts that could not be read (a process gone, a file removed).
    pub unreadable: Vec<String>,
}

impl Report {
    pub fn bytes(&self) -> u64 {
        self.scanned.iter().map(|(_, n)| n).sum()
    }
}

struct Needle {
    label: String,
    form: &'static str,
    bytes: Zeroizing<Vec<u8>>,
}

/// The canaries in their searched forms.
pub struct Needles {
    needles: Vec<Needle>,
    prefixes: [Vec<u8>; 2],
    longest: usize,
}

impl fmt::Debug for Needles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Needles")
            .field("count", &self.needles.len())
            .finish_non_exhaustive()
    }
}

impl Needles {
    pub fn new<'a>(canaries: impl IntoIterator<Item = &'a Canary>) -> Self {
        let mut needles = Vec::new();
        for c in canaries {
            let raw = c.value.as_bytes();
            needles.push(Needle {
                label: c.label.clone(),
                form: "raw",
                bytes: Zeroizing::new(raw.to_vec()),
            });
            for engine in [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
            ] {
                let b = Zeroizing::new(engine.encode(raw).into_bytes());
                if !needles.iter().any(|n: &Needle| n.bytes == b) {
                    needles.push(Needle {
                        label: c.label.clone(),
                        form: "base64",
                        bytes: b,
                    });
                }
            }
        }
        let longest = needles.iter().map(|n| n.bytes.len()).max().unwrap_or(0);
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(PREFIX)
            .into_bytes();
        Self {
            needles,
            prefixes: [PREFIX.as_bytes().to_vec(), b64],
            longest,
        }
    }

    /// The needles found in `hay`, by index.
    fn find_in(&self, hay: &[u8], found: &mut Vec<usize>) {
        for prefix in &self.prefixes {
            let Some(&first) = prefix.first() else {
                continue;
            };
            let mut at = 0;
            while let Some(off) = hay[at..].iter().position(|&b| b == first) {
                let i = at + off;
                if hay[i..].starts_with(prefix) {
                    for (n, needle) in self.needles.iter().enumerate() {
                        if hay[i..].starts_with(&needle.bytes) && !found.contains(&n) {
                            found.push(n);
                        }
                    }
                }
                at = i + 1;
            }
        }
    }
}

/// Scans every target for every canary.
pub fn scan(needles: &Needles, targets: &[Target]) -> Report {
    let mut report = Report::default();
    for t in targets {
        let mut hits: Vec<(usize, String)> = Vec::new();
        let read = match t {
            Target::Memory { pid, .. } => scan_memory(needles, *pid, &mut hits, &mut report),
            Target::Environ { pid, .. } => {
                let path = PathBuf::from(format!("/proc/{pid}/environ"));
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        let mut found = Vec::new();
                        needles.find_in(&bytes, &mut found);
                        hits.extend(found.into_iter().map(|n| (n, "environ".to_owned())));
                        bytes.len() as u64
                    }
                    Err(e) => {
                        report.unreadable.push(format!("{}: {e}", path.display()));
                        0
                    }
                }
            }
            Target::Files { path, .. } => scan_files(needles, path, None, &mut hits, &mut report),
            Target::FilesSince { path, since, .. } => {
                scan_files(needles, path, Some(*since), &mut hits, &mut report)
            }
            Target::Text { text, .. } => {
                let mut found = Vec::new();
                needles.find_in(text.as_bytes(), &mut found);
                hits.extend(found.into_iter().map(|n| (n, String::new())));
                text.len() as u64
            }
        };
        report.scanned.push((t.name().to_owned(), read));
        for (n, place) in hits {
            let needle = &needles.needles[n];
            let f = Finding {
                canary: needle.label.clone(),
                form: needle.form,
                target: t.name().to_owned(),
                place,
            };
            if !report.findings.contains(&f) {
                report.findings.push(f);
            }
        }
    }
    report
}

/// Reads every readable mapping of `pid` through `/proc/<pid>/mem`.
fn scan_memory(
    needles: &Needles,
    pid: u32,
    hits: &mut Vec<(usize, String)>,
    report: &mut Report,
) -> u64 {
    let maps = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(m) => m,
        Err(e) => {
            report.unreadable.push(format!("/proc/{pid}/maps: {e}"));
            return 0;
        }
    };
    let mut mem = match std::fs::File::open(format!("/proc/{pid}/mem")) {
        Ok(f) => f,
        Err(e) => {
            report.unreadable.push(format!("/proc/{pid}/mem: {e}"));
            return 0;
        }
    };
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK + needles.longest];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        if !perms.starts_with('r') || path == "[vvar]" || path == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let place = if path.is_empty() {
            format!("mapping {start:x}")
        } else {
            format!("mapping {start:x} {path}")
        };
        let mut found = Vec::new();
        let mut at = start;
        // `carry` bytes at the front of `buf` are the previous chunk's tail,
        // so that a canary across two chunks is still seen whole.
        let mut carry = 0usize;
        while at < end {
            let want = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            if mem.seek(SeekFrom::Start(at)).is_err() {
                break;
            }
            let got = match mem.read(&mut buf[carry..carry + want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            total += got as u64;
            let filled = carry + got;
            needles.find_in(&buf[..filled], &mut found);
            let keep = needles.longest.saturating_sub(1).min(filled);
            buf.copy_within(filled - keep..filled, 0);
            carry = keep;
            at += got as u64;
        }
        hits.extend(found.into_iter().map(|n| (n, place.clone())));
    }
    total
}

fn scan_files(
    needles: &Needles,
    root: &Path,
    since: Option<SystemTime>,
    hits: &mut Vec<(usize, String)>,
    report: &mut Report,
) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            match std::fs::read_dir(&path) {
                Ok(entries) => stack.extend(entries.flatten().map(|e| e.path())),
                Err(e) => report.unreadable.push(format!("{}: {e}", path.display())),
            }
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        if let Some(since) = since
            && meta.modified().is_ok_and(|m| m < since)
        {
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            // Removed while we walked, or a socket's node.
            continue;
        };
        let mut bytes = Vec::new();
        if f.take(MAX_FILE).read_to_end(&mut bytes).is_err() {
            continue;
        }
        total += bytes.len() as u64;
        let mut found = Vec::new();
        needles.find_in(&bytes, &mut found);
        hits.extend(found.into_iter().map(|n| (n, path.display().to_string())));
    }
    total
}

/// The scanner's positive control: a control canary put where the scan
/// looks (a process's environment and memory, a file as base64) must be
/// found in each, or the scan proves nothing.
pub struct Control {
    pub canary: Canary,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("canary", &self.canary)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Control {
    pub fn plant() -> anyhow::Result<Self> {
        let canary = Canary::new("positive control");
        let child = std::process::Command::new("sleep")
            .arg("120")
            .env("BULKHEAD_CONTROL_CANARY", canary.value.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        // Until the child has exec'd `sleep`, its /proc environ is still the
        // parent's copy without the canary (a scan under load read that and
        // missed it). Its cmdline changes with the exec.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut child = child;
        while !std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"sleep\0")) {
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the control process did not start within 5 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-demo-control-")
            .tempdir()?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(canary.value.as_bytes());
        std::fs::write(dir.path().join("planted.txt"), encoded)?;
        Ok(Self { canary, child, dir })
    }

    pub fn targets(&self) -> Vec<Target> {
        let pid = self.child.id();
        vec![
            Target::Environ {
                name: "control process environ".into(),
                pid,
            },
            Target::Memory {
                name: "control process memory".into(),
                pid,
            },
            Target::Files {
                name: "control file (base64)".into(),
                path: self.dir.path().to_owned(),
            },
        ]
    }

    /// Ends the control process (by its PID) and removes its file.
    pub fn remove(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.dir.close();
    }
}
