//! Shared by the command-line tests: running `cqrs`.

/// Runs `cqrs` with `before` and then `args` (no terminal on stdin): (exit code, stdout, stderr).
pub fn run(before: &[&str], args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(before)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cqrs {before:?} {args:?}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
