//! The macros' compile-time cost: a generated crate of `aggregates` aggregates (5 commands and 5
//! events each) written with the derives, and the same domain with every trait written by hand,
//! in one generated workspace; a clean build (of that crate; its dependencies built before) and an
//! incremental rebuild (one aggregate's file changed) of each, timed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PER: usize = 5;

fn derived(k: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "//! Aggregate {k}, with the derives.\n");
    let _ = writeln!(s, "use evently_core::prelude::*;\n");
    let _ = writeln!(s, "#[derive(Debug, Clone, PartialEq, DomainEvent)]");
    let _ = writeln!(s, "#[event(aggregate = Agg{k})]");
    let _ = writeln!(s, "pub enum Agg{k}Event {{");
    for i in 0..PER {
        let _ = writeln!(s, "    Happened{i} {{ n: u64, note: String }},");
    }
    let _ = writeln!(s, "}}\n");
    let _ = writeln!(s, "#[derive(Debug, Clone, Command)]");
    let _ = writeln!(s, "#[command(aggregate = Agg{k})]");
    let _ = writeln!(s, "pub enum Agg{k}Command {{");
    for i in 0..PER {
        let create = if i == 0 { "#[command(create)] " } else { "" };
        let _ = writeln!(s, "    {create}Do{i} {{ n: u64 }},");
    }
    let _ = writeln!(s, "}}\n");
    let _ = writeln!(
        s,
        "#[derive(Debug, thiserror::Error)]\n#[error(\"refused\")]\npub struct Refused{k};\n"
    );
    let _ = writeln!(s, "#[derive(Debug, Default, Aggregate)]");
    let _ = writeln!(
        s,
        "#[aggregate(name = \"agg{k}\", command = Agg{k}Command, event = Agg{k}Event, error = Refused{k})]"
    );
    let _ = writeln!(s, "pub struct Agg{k} {{\n    pub total: u64,\n}}\n");
    let _ = writeln!(s, "impl Agg{k} {{");
    for i in 0..PER {
        let _ = writeln!(
            s,
            "    fn do{i}(&self, n: u64) -> Result<Vec<Agg{k}Event>, Refused{k}> {{\n        if n == u64::MAX {{ return Err(Refused{k}); }}\n        Ok(vec![Agg{k}Event::Happened{i} {{ n, note: String::new() }}])\n    }}"
        );
        let _ = writeln!(
            s,
            "    fn apply_happened{i}(&mut self, n: &u64, _note: &str) {{\n        self.total += n;\n    }}"
        );
    }
    let _ = writeln!(s, "}}");
    s
}

/// Repeats `line` (with `__I__` for the variant) once per variant.
fn each(line: &str) -> String {
    (0..PER)
        .map(|i| line.replace("__I__", &i.to_string()))
        .collect()
}

fn by_hand(k: usize) -> String {
    // One pair of field structs per variant, as events generally differ in their fields;
    // serialized by reference, as a careful hand-written version would.
    let names: Vec<String> = (0..PER).map(|i| format!("\"Happened{i}\"")).collect();
    let text = format!(
        r#"//! Aggregate __K__, every trait by hand.

use evently_core::event::EncodeError;
use evently_core::{{Aggregate, Command, DecodeError, DomainEvent, EncodedEvent, StreamExpectation}};
use serde::{{Deserialize, Serialize}};

#[derive(Debug, Clone, PartialEq)]
pub enum Agg__K__Event {{
{variants}}}

{structs}
impl DomainEvent for Agg__K__Event {{
    const EVENT_TYPES: &'static [&'static str] = &[{names}];
    const AGGREGATE_TYPE: Option<&'static str> = Some("agg__K__");
    fn event_type(&self) -> &'static str {{
        match self {{
{types}        }}
    }}
    fn schema_version(&self) -> u32 {{
        1
    }}
    fn encode(&self) -> Result<EncodedEvent, EncodeError> {{
        let event_type = self.event_type();
        let payload = match self {{
{encode}        }}
        .map_err(|source| EncodeError {{ event_type, source }})?;
        Ok(EncodedEvent {{ event_type, schema_version: 1, payload }})
    }}
    fn decode(event_type: &str, schema_version: u32, payload: &serde_json::Value) -> Result<Self, DecodeError> {{
        let Some(known) = Self::EVENT_TYPES.iter().find(|t| **t == event_type) else {{
            return Err(DecodeError::UnknownType {{ event_type: event_type.to_owned(), known: Self::EVENT_TYPES }});
        }};
        if schema_version != 1 {{
            return Err(DecodeError::UnsupportedVersion {{ event_type: known, found: schema_version, oldest: 1, current: 1 }});
        }}
        let fail = |e: serde_json::Error| DecodeError::Payload {{ event_type: known, schema_version, message: e.to_string() }};
        Ok(match *known {{
{decode}            _ => return Err(DecodeError::UnknownType {{ event_type: event_type.to_owned(), known: Self::EVENT_TYPES }}),
        }})
    }}
    // What the derive also gives: the current version straight from the JSON text.
    fn decode_json(event_type: &str, schema_version: u32, json: &str) -> Result<Self, DecodeError> {{
        let Some(known) = Self::EVENT_TYPES.iter().find(|t| **t == event_type) else {{
            return Err(DecodeError::UnknownType {{ event_type: event_type.to_owned(), known: Self::EVENT_TYPES }});
        }};
        if schema_version != 1 {{
            return Err(DecodeError::UnsupportedVersion {{ event_type: known, found: schema_version, oldest: 1, current: 1 }});
        }}
        let fail = |e: serde_json::Error| DecodeError::Payload {{ event_type: known, schema_version, message: e.to_string() }};
        Ok(match *known {{
{decode_text}            _ => return Err(DecodeError::UnknownType {{ event_type: event_type.to_owned(), known: Self::EVENT_TYPES }}),
        }})
    }}
}}

#[derive(Debug, Clone)]
pub enum Agg__K__Command {{
{commands}}}

#[derive(Debug, thiserror::Error)]
#[error("refused")]
pub struct Refused__K__;

impl Command for Agg__K__Command {{
    type Aggregate = Agg__K__;
    fn command_name(&self) -> &'static str {{
        match self {{
{command_names}        }}
    }}
    fn expectation(&self) -> StreamExpectation {{
        match self {{
            Self::Do0 {{ .. }} => StreamExpectation::MustNotExist,
            _ => StreamExpectation::MustExist,
        }}
    }}
    fn handle(self, _state: &Agg__K__) -> Result<Vec<Agg__K__Event>, Refused__K__> {{
        let note = String::new();
        let event = match self {{
{handle}        }};
        Ok(vec![event])
    }}
}}

#[derive(Debug, Default)]
pub struct Agg__K__ {{
    pub total: u64,
}}

impl Aggregate for Agg__K__ {{
    const NAME: &'static str = "agg__K__";
    type Command = Agg__K__Command;
    type Event = Agg__K__Event;
    type Error = Refused__K__;
    fn initial() -> Self {{
        Self::default()
    }}
    fn apply(&mut self, event: &Agg__K__Event) {{
        match event {{
{apply}        }}
    }}
}}
"#,
        variants = each("    Happened__I__ { n: u64, note: String },\n"),
        structs = each(
            "#[derive(Serialize)]\nstruct Happened__I__Ref<'a> { n: u64, note: &'a str }\n\
             #[derive(Deserialize)]\nstruct Happened__I__Fields { n: u64, note: String }\n"
        ),
        names = names.join(", "),
        types = each("            Self::Happened__I__ { .. } => \"Happened__I__\",\n"),
        encode = each(
            "            Self::Happened__I__ { n, note } => serde_json::to_value(Happened__I__Ref { n: *n, note }),\n"
        ),
        decode = each(
            "            \"Happened__I__\" => { let f = Happened__I__Fields::deserialize(payload).map_err(fail)?; Self::Happened__I__ { n: f.n, note: f.note } }\n"
        ),
        decode_text = each(
            "            \"Happened__I__\" => { let f: Happened__I__Fields = serde_json::from_str(json).map_err(fail)?; Self::Happened__I__ { n: f.n, note: f.note } }\n"
        ),
        commands = each("    Do__I__ { n: u64 },\n"),
        command_names = each("            Self::Do__I__ { .. } => \"Do__I__\",\n"),
        handle = each(
            "            Self::Do__I__ { n } => { if n == u64::MAX { return Err(Refused__K__); } Agg__K__Event::Happened__I__ { n, note } }\n"
        ),
        apply = each("            Agg__K__Event::Happened__I__ { n, .. } => self.total += n,\n"),
    );
    text.replace("__K__", &k.to_string())
}

/// Writes the generated workspace into `dir`: crates `gen-derive` and `gen-hand`.
fn generate(dir: &Path, aggregates: usize) -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new(".."))
        .to_path_buf();
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("Cargo.toml"),
        "[workspace]\nresolver = \"3\"\nmembers = [\"gen-derive\", \"gen-hand\"]\n",
    )?;
    // The workspace's versions: nothing is resolved anew.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock"))?;
    for (name, body) in [
        ("gen-derive", derived as fn(usize) -> String),
        ("gen-hand", by_hand),
    ] {
        let src = dir.join(name).join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(
            dir.join(name).join("Cargo.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dependencies]\n\
                 evently-core = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\
                 serde_json = \"1\"\nthiserror = \"2\"\n",
                root.join("cqrs-core")
            ),
        )?;
        let mut lib = String::from(
            "//! Generated by the compile-cost benchmark.\n#![allow(missing_docs, dead_code)]\n",
        );
        for k in 0..aggregates {
            let _ = writeln!(lib, "pub mod agg{k};");
            std::fs::write(src.join(format!("agg{k}.rs")), body(k))?;
        }
        std::fs::write(src.join("lib.rs"), lib)?;
    }
    Ok(())
}

fn cargo(dir: &Path, args: &[&str]) -> Result<f64, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let start = Instant::now();
    let output = Command::new(cargo)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .args(args)
        .output()
        .map_err(|e| format!("cargo {args:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo {args:?} in {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The timings, in seconds: (clean derive, clean hand, incremental derive, incremental hand),
/// each a list over `runs`.
pub struct Timings {
    /// Clean builds of the crate with the derives.
    pub clean_derive: Vec<f64>,
    /// Clean builds of the hand-written crate.
    pub clean_hand: Vec<f64>,
    /// Rebuilds after one aggregate's file changed, with the derives.
    pub incremental_derive: Vec<f64>,
    /// The same, by hand.
    pub incremental_hand: Vec<f64>,
}

/// Generates into `dir` and times `runs` clean builds and incremental rebuilds of each crate.
///
/// # Errors
/// A generated crate that does not build, or files that cannot be written.
pub fn measure(dir: &Path, aggregates: usize, runs: usize) -> Result<Timings, String> {
    generate(dir, aggregates).map_err(|e| format!("generating into {}: {e}", dir.display()))?;
    // The dependencies (evently-core, serde, ...) once, outside the timings.
    cargo(dir, &["build", "--quiet", "--workspace"])?;
    let mut t = Timings {
        clean_derive: Vec::new(),
        clean_hand: Vec::new(),
        incremental_derive: Vec::new(),
        incremental_hand: Vec::new(),
    };
    for run in 0..runs {
        for (name, clean, incremental) in [
            ("gen-derive", &mut t.clean_derive, &mut t.incremental_derive),
            ("gen-hand", &mut t.clean_hand, &mut t.incremental_hand),
        ] {
            cargo(dir, &["clean", "--quiet", "-p", name])?;
            clean.push(cargo(dir, &["build", "--quiet", "-p", name])?);
            // A change inside one aggregate's module (a new constant), as an edit would make.
            let file: PathBuf = dir.join(name).join("src").join("agg0.rs");
            let mut text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            let _ = writeln!(text, "pub const EDIT_{run}: u32 = {run};");
            std::fs::write(&file, text).map_err(|e| e.to_string())?;
            incremental.push(cargo(dir, &["build", "--quiet", "-p", name])?);
        }
    }
    Ok(t)
}
