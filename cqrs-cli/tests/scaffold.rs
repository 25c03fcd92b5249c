//! `cqrs new aggregate` into a fresh crate that depends on the `evently` facade alone: the
//! generated module (its derives resolving the framework through the facade) compiles without
//! warnings and its tests pass.

use std::path::Path;
use std::process::Command;

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn a_scaffolded_aggregate_builds_and_its_tests_pass() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("no workspace"));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffold");
    let krate = tmp.join("crate");
    if krate.exists() {
        std::fs::remove_dir_all(&krate).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::create_dir_all(krate.join("src")).unwrap_or_else(|e| panic!("{e}"));
    let manifest = format!(
        "[package]\nname = \"scaffolded\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
         [dependencies]\nevently = {{ path = {:?} }}\nthiserror = \"2\"\n\n\
         # Not a member of the workspace this directory sits in.\n[workspace]\n",
        workspace.join("evently")
    );
    std::fs::write(krate.join("Cargo.toml"), manifest).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(krate.join("src/lib.rs"), "//! A crate of one aggregate.\n")
        .unwrap_or_else(|e| panic!("{e}"));
    // The workspace's versions, so nothing is resolved anew.
    std::fs::copy(workspace.join("Cargo.lock"), krate.join("Cargo.lock"))
        .unwrap_or_else(|e| panic!("{e}"));

    let said = run(Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(["new", "aggregate", "SupportTicket", "--path"])
        .arg(krate.join("src")));
    assert!(
        said.contains("support_ticket.rs") && said.contains("declared `mod support_ticket`"),
        "{said}"
    );
    let lib = std::fs::read_to_string(krate.join("src/lib.rs")).unwrap_or_else(|e| panic!("{e}"));
    assert!(lib.ends_with("pub mod support_ticket;\n"), "{lib}");

    // Again: refused, nothing overwritten.
    let again = Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(["new", "aggregate", "SupportTicket", "--path"])
        .arg(krate.join("src"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already; not overwritten"));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let tested = run(Command::new(cargo)
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", tmp.join("target"))
        .env("RUSTFLAGS", "-D warnings")
        .args(["test", "--quiet"]));
    assert!(tested.contains("test result: ok. 4 passed"), "{tested}");
}
