//! Compile-time behaviour of `#[derive(Quantizable)]`: what compiles, and the errors (with
//! their spans) for what does not. Regenerate the pinned `.stderr` files with
//! `TRYBUILD=overwrite cargo test --test ui`, then read every one.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/compile_fail/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
