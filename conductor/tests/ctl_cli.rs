//! `tandem ctl` as users run it: the real binary, its help, and a clear
//! error (not a panic) when no conductor answers.

use std::process::Command;

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("ctl")
        .args(args)
        .env_remove("TANDEM_ADMIN")
        .output()
        .expect("run tandem")
}

#[test]
fn unreachable_admin_api_is_a_clear_error() {
    // Port 1 (tcpmux) has no listener here: the connection is refused.
    let out = ctl(&["--admin", "127.0.0.1:1", "nodes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("cannot reach the conductor's admin API at 127.0.0.1:1"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn help_lists_the_commands_and_examples() {
    let out = ctl(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["nodes", "drain", "undrain", "requests", "cache", "policy", "slo", "--json", "--admin", "Examples:"] {
        assert!(help.contains(word), "{word:?} missing from:\n{help}");
    }
    let out = ctl(&["slo", "set"]);
    assert_eq!(out.status.code(), Some(2), "slo set with nothing to set is a usage error");
    let out = ctl(&["cache", "lookup", "--chat"]);
    assert_eq!(out.status.code(), Some(2), "--chat needs --text");
}
