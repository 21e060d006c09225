//! The printed story: headings, narration, and one ✓ or ✗ per guarantee
//! checked, tallied so that the demo exits non-zero when any failed.

use std::fmt::Display;
use std::io::Write as _;

/// What the demo told and which of its checks held.
#[derive(Debug, Default)]
pub struct Story {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Story {
    pub fn new() -> Self {
        Self::default()
    }

    /// A scenario's heading.
    pub fn chapter(&self, title: &str, blurb: &str) {
        println!();
        println!("━━ {title} ━━");
        if !blurb.is_empty() {
            println!("{blurb}");
        }
        flush();
    }

    /// A step of the scenario.
    pub fn step(&self, text: impl Display) {
        println!("\n▸ {text}");
        flush();
    }

    /// A line of narration under a step.
    pub fn say(&self, text: impl Display) {
        println!("  {text}");
        flush();
    }

    /// Records a guarantee check; prints ✓ or ✗ (with why). Returns `ok`.
    pub fn check(&mut self, what: impl Into<String>, ok: bool, why: impl Display) -> bool {
        let what = what.into();
        if ok {
            println!("  ✓ {what}");
            self.passed.push(what);
        } else {
            println!("  ✗ {what}: {why}");
            self.failed.push(what);
        }
        flush();
        ok
    }

    pub fn passed(&self) -> usize {
        self.passed.len()
    }

    pub fn failed(&self) -> &[String] {
        &self.failed
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
}
