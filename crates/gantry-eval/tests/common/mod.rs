//! What the binary's tests share: reading its one JSON line, and checking a refusal.

use std::process::Output;

/// The one JSON line a successful run prints on stdout.
pub fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line expected, got {stdout:?}"
    );
    serde_json::from_str(&stdout).unwrap()
}

/// A refused run: non-zero exit, nothing on stdout, and every needle on stderr.
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "bad input accepted");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}
