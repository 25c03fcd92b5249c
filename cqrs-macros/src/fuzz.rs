//! Arbitrary attribute token streams fed to every derive: whatever is written inside
//! `#[event(..)]`, `#[command(..)]`, `#[aggregate(..)]`, `#[projection(..)]`, `#[saga(..)]` and
//! `#[step(..)]`, the derive returns tokens (its errors or code), never panics.

use std::panic::{AssertUnwindSafe, catch_unwind};

use syn::DeriveInput;

/// A small deterministic generator (xorshift64*), so a failure names a seed to replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap_or(1)).unwrap_or(0)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

const KEYS: &[&str] = &[
    "name",
    "version",
    "upcast",
    "from",
    "with",
    "apply",
    "handler",
    "create",
    "create_or_update",
    "aggregate",
    "command",
    "event",
    "error",
    "snapshot",
    "every",
    "events",
    "tables",
    "context",
    "data",
    "execute",
    "compensate",
    "retry",
    "attempts",
    "backoff_ms",
    "max_delay_ms",
    "timeout_ms",
    "rename",
    "alias",
    "default",
    "nmae",
    "r#type",
    "_",
];
const VALUES: &[&str] = &[
    "\"x\"",
    "\"\"",
    "\"a b\"",
    "0",
    "1",
    "3",
    "-2",
    "18446744073709551616",
    "1.5",
    "'c'",
    "true",
    "Counter",
    "crate::x::Y",
    "self",
    "Self",
    "Vec<u8>",
    "b\"x\"",
    "1u8",
    "0x10",
    "Counter::go",
    "go()",
];
const PUNCT: &[&str] = &["=", ",", "::", "-", ".", "#", ";", "=>", "&", "?"];

/// A random attribute body: keys, `key = value`, nested lists, stray punctuation and groups.
fn body(rng: &mut Rng, depth: usize) -> String {
    let mut out = Vec::new();
    for _ in 0..rng.below(5) {
        let item = match rng.below(10) {
            0..=2 => format!("{} = {}", rng.pick(KEYS), rng.pick(VALUES)),
            3 => rng.pick(KEYS).to_owned(),
            4 if depth < 2 => format!("{}({})", rng.pick(KEYS), body(rng, depth + 1)),
            5 => rng.pick(VALUES).to_owned(),
            6 => rng.pick(PUNCT).to_owned(),
            7 if depth < 2 => format!("[{}]", body(rng, depth + 1)),
            8 => format!(
                "{} = {} {}",
                rng.pick(KEYS),
                rng.pick(VALUES),
                rng.pick(VALUES)
            ),
            _ => format!("{} {}", rng.pick(KEYS), rng.pick(PUNCT)),
        };
        out.push(item);
    }
    let separator = if rng.below(6) == 0 { " " } else { ", " };
    out.join(separator)
}

/// `#[name(...)]` with a random body, or nothing, or a bare `#[name]` / `#[name = ..]`.
fn attr(rng: &mut Rng, name: &str) -> String {
    match rng.below(8) {
        0 => String::new(),
        1 => format!("#[{name}]"),
        2 => format!("#[{name} = {}]", rng.pick(VALUES)),
        3 => format!("#[{name}({})] #[{name}({})]", body(rng, 0), body(rng, 0)),
        _ => format!("#[{name}({})]", body(rng, 0)),
    }
}

fn enum_input(rng: &mut Rng, outer: &str, inner: &[&str]) -> String {
    let mut variants = Vec::new();
    for (i, shape) in [
        "A { x: u32, y: String }",
        "B",
        "C(u32)",
        "D(u8, u8)",
        "E {}",
    ]
    .iter()
    .enumerate()
    {
        if rng.below(4) == 0 && i > 0 {
            continue;
        }
        let attrs: Vec<String> = inner.iter().map(|name| attr(rng, name)).collect();
        variants.push(format!("{} {shape}", attrs.join(" ")));
    }
    format!(
        "{} enum Subject {{ {} }}",
        attr(rng, outer),
        variants.join(", ")
    )
}

fn struct_input(rng: &mut Rng, outer: &str) -> String {
    format!("{} struct Subject {{ total: u64 }}", attr(rng, outer))
}

type Derive = fn(&DeriveInput) -> proc_macro2::TokenStream;
type Input = fn(&mut Rng) -> String;

#[test]
fn arbitrary_attributes_never_panic_any_derive() {
    let derives: [(&str, Derive, Input); 5] = [
        ("DomainEvent", crate::expand::event::derive, |rng| {
            enum_input(rng, "event", &["event", "serde"])
        }),
        ("Command", crate::expand::command::derive, |rng| {
            enum_input(rng, "command", &["command"])
        }),
        ("Saga", crate::expand::saga::derive, |rng| {
            enum_input(rng, "saga", &["step"])
        }),
        ("Aggregate", crate::expand::aggregate::derive, |rng| {
            struct_input(rng, "aggregate")
        }),
        ("Projection", crate::expand::projection::derive, |rng| {
            struct_input(rng, "projection")
        }),
    ];
    let mut parsed = 0;
    for (derive_name, derive, input) in derives {
        for seed in 1..=2_000_u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let source = input(&mut rng);
            // Bodies are balanced, but not every one is a valid item (e.g. `#[x = a b]`).
            let Ok(item) = syn::parse_str::<DeriveInput>(&source) else {
                continue;
            };
            parsed += 1;
            let outcome = catch_unwind(AssertUnwindSafe(|| derive(&item)));
            assert!(
                outcome.is_ok(),
                "derive({derive_name}) panicked on seed {seed}:\n{source}"
            );
        }
    }
    // Most inputs reach the derives.
    assert!(
        parsed > 8_000,
        "only {parsed} of 10,000 inputs parsed as items"
    );
}
