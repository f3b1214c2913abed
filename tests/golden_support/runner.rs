//! Runs the cases of a directory, each in its own process.
//!
//! The test binary re-executes itself once per case with `QAT_GOLDEN_CASE` set to the case's
//! file; that child runs the case under `catch_unwind` and prints one result line. A panic
//! (or a poisoned thread pool, or an abort) therefore stays inside its case: the parent
//! reports that case as failed with what the child left on stderr, and every other case
//! still runs and is reported.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, ExitCode};

use crate::case::{json_files, load, stem, Case, R};

/// Set (to a case file) in the child process that runs that case.
pub const CASE_ENV: &str = "QAT_GOLDEN_CASE";
/// Self-test only (see selftest.rs): `panic:<case name>` or `abort:<case name>`, separated by
/// commas, makes the child running that case panic inside the case or abort the process.
pub const INJECT_ENV: &str = "QAT_GOLDEN_INJECT";
/// Prefix of the child's result line.
const RESULT: &str = "golden-result:";

/// A kind and the function that checks one of its cases.
pub type Handler = fn(&Case) -> R<()>;

/// Counts of the summary line.
#[derive(Default)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

impl Tally {
    pub fn report(&mut self, what: &str, outcome: R<()>) {
        match outcome {
            Ok(()) => {
                self.passed += 1;
                println!("ok {what}");
            }
            Err(why) => {
                self.failed += 1;
                println!("FAIL {what}: {why}");
            }
        }
    }
}

/// Child side: runs the case in `path` and prints its result line.
pub fn child(path: &Path, handlers: &[(&str, Handler)]) -> ExitCode {
    let outcome = load(path).and_then(|case| run_caught(&case, handlers));
    match outcome {
        Ok(()) => println!("{RESULT} ok"),
        // One line: the parent reads the last result line.
        Err(why) => println!("{RESULT} FAIL {}", why.replace('\n', " | ")),
    }
    ExitCode::SUCCESS
}

fn run_caught(case: &Case, handlers: &[(&str, Handler)]) -> R<()> {
    let handler = handlers
        .iter()
        .find(|(kind, _)| *kind == case.kind)
        .map(|(_, h)| *h)
        .ok_or_else(|| format!("unknown kind `{}`", case.kind))?;
    match std::panic::catch_unwind(AssertUnwindSafe(|| {
        inject(&case.name);
        handler(case)
    })) {
        Ok(outcome) => outcome,
        Err(payload) => Err(format!("panicked: {}", panic_message(payload.as_ref()))),
    }
}

fn inject(name: &str) {
    let Ok(spec) = std::env::var(INJECT_ENV) else {
        return;
    };
    for item in spec.split(',') {
        match item.split_once(':') {
            Some(("panic", n)) if n == name => panic!("injected panic in {name}"),
            Some(("abort", n)) if n == name => std::process::abort(),
            _ => {}
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(not a string)".into()
    }
}

/// Parent side: every case of `dir` in a child process, one line each, then the coverage
/// check: every handled kind must have a case in `dir`.
pub fn run_dir(dir: &Path, handlers: &[(&str, Handler)], tally: &mut Tally) {
    let files = match json_files(dir) {
        Ok(f) => f,
        Err(e) => return tally.report(&format!("golden {}", dir.display()), Err(e)),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return tally.report("golden", Err(format!("cannot find own binary: {e}"))),
    };
    let mut kinds = BTreeSet::new();
    for path in &files {
        let (label, outcome) = match load(path) {
            Err(e) => (format!("? {}", stem(path)), Err(e)),
            Ok(case) => {
                kinds.insert(case.kind.clone());
                (
                    format!("{} {}", case.kind, case.name),
                    run_child(&exe, path),
                )
            }
        };
        tally.report(&label, outcome);
    }
    let missing: Vec<&str> = handlers
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| !kinds.contains(*k))
        .collect();
    let coverage = if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no case for handled kind(s) {}",
            missing.join(", ")
        ))
    };
    tally.report(&format!("coverage {}", dir.display()), coverage);
}

fn run_child(exe: &Path, case: &Path) -> R<()> {
    let out = Command::new(exe)
        .env(CASE_ENV, case)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot start the case's process: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout.lines().rev().find_map(|l| l.strip_prefix(RESULT));
    match (result.map(str::trim), out.status.success()) {
        (Some("ok"), true) => Ok(()),
        (Some(r), true) => Err(r.strip_prefix("FAIL ").unwrap_or(r).to_string()),
        (_, _) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            Err(format!(
                "crashed ({}): {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    }
}
