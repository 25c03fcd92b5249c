//! The trybuild suite: every misuse of a derive is a compile error on the offending token that says
//! what to write instead (`ui/<derive>/<mistake>.rs` with its `.stderr`), and the `ui/pass/` cases
//! compile. Regenerate with `TRYBUILD=overwrite cargo test -p cqrs-tests --test ui` and read each
//! `.stderr` before accepting it.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/event/*.rs");
    cases.compile_fail("ui/command/*.rs");
    cases.compile_fail("ui/aggregate/*.rs");
    cases.compile_fail("ui/projection/*.rs");
    cases.compile_fail("ui/saga/*.rs");
    cases.pass("ui/pass/*.rs");
}
