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
    let _ = writeln!(s, "use cqrs_core::prelude::*;\n");
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

fn by_hand(k: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "//! Aggregate {k}, every trait by hand.\n");
    let _ = writeln!(
        s,
        "use cqrs_core::{{Aggregate, Command, DecodeError, DomainEvent, EncodeError, EncodedEvent, StreamExpectation}};\nuse serde::{{Deserialize, Serialize}};\n"
    );
    let _ = writeln!(
        s,
        "#[derive(Debug, Clone, PartialEq)]\npub enum Agg{k}Event {{"
    );
    for i in 0..PER {
        let _ = writeln!(s, "    Happened{i} {{ n: u64, note: String }},");
    }
    let _ = writeln!(s, "}}\n");
    let _ = writeln!(
        s,
        "#[derive(Serialize)]\nstruct FieldsRef<'a> {{ n: u64, note: &'a str }}"
    );
    let _ = writeln!(
        s,
        "#[derive(Deserialize)]\nstruct Fields {{ n: u64, note: String }}\n"
    );
    let names: Vec<String> = (0..PER).map(|i| format!("\"Happened{i}\"")).collect();
    let _ = writeln!(s, "impl DomainEvent for Agg{k}Event {{");
    let _ = writeln!(
        s,
        "    const EVENT_TYPES: &'static [&'static str] = &[{}];",
        names.join(", ")
    );
    let _ = writeln!(
        s,
        "    const AGGREGATE_TYPE: Option<&'static str> = Some(\"agg{k}\");"
    );
    let _ = writeln!(
        s,
        "    fn event_type(&self) -> &'static str {{\n        match self {{"
    );
    for i in 0..PER {
        let _ = writeln!(
            s,
            "            Self::Happened{i} {{ .. }} => \"Happened{i}\","
        );
    }
    let _ = writeln!(
        s,
        "        }}\n    }}\n    fn schema_version(&self) -> u32 {{\n        1\n    }}"
    );
    let _ = writeln!(
        s,
        "    fn encode(&self) -> Result<EncodedEvent, EncodeError> {{"
    );
    let _ = writeln!(
        s,
        "        let event_type = self.event_type();\n        let (n, note) = match self {{"
    );
    for i in 0..PER {
        let _ = writeln!(
            s,
            "            Self::Happened{i} {{ n, note }} => (*n, note.as_str()),"
        );
    }
    let _ = writeln!(
        s,
        "        }};\n        let payload = serde_json::to_value(FieldsRef {{ n, note }}).map_err(|source| EncodeError {{ event_type, source }})?;\n        Ok(EncodedEvent {{ event_type, schema_version: 1, payload }})\n    }}"
    );
    let _ = writeln!(
        s,
        "    fn decode(event_type: &str, schema_version: u32, payload: &serde_json::Value) -> Result<Self, DecodeError> {{"
    );
    let _ = writeln!(
        s,
        "        let Some(known) = Self::EVENT_TYPES.iter().find(|t| **t == event_type) else {{\n            return Err(DecodeError::UnknownType {{ event_type: event_type.to_owned(), known: Self::EVENT_TYPES }});\n        }};"
    );
    let _ = writeln!(
        s,
        "        if schema_version != 1 {{\n            return Err(DecodeError::UnsupportedVersion {{ event_type: known, found: schema_version, oldest: 1, current: 1 }});\n        }}"
    );
    let _ = writeln!(
        s,
        "        let f = Fields::deserialize(payload).map_err(|e| DecodeError::Payload {{ event_type: known, schema_version, message: e.to_string() }})?;\n        Ok(match *known {{"
    );
    for i in 0..PER {
        let _ = writeln!(
            s,
            "            \"Happened{i}\" => Self::Happened{i} {{ n: f.n, note: f.note }},"
        );
    }
    let _ = writeln!(
        s,
        "            _ => return Err(DecodeError::UnknownType {{ event_type: event_type.to_owned(), known: Self::EVENT_TYPES }}),\n        }})\n    }}\n}}\n"
    );
    let _ = writeln!(s, "#[derive(Debug, Clone)]\npub enum Agg{k}Command {{");
    for i in 0..PER {
        let _ = writeln!(s, "    Do{i} {{ n: u64 }},");
    }
    let _ = writeln!(s, "}}\n");
    let _ = writeln!(
        s,
        "#[derive(Debug, thiserror::Error)]\n#[error(\"refused\")]\npub struct Refused{k};\n"
    );
    let _ = writeln!(
        s,
        "impl Command for Agg{k}Command {{\n    type Aggregate = Agg{k};"
    );
    let _ = writeln!(
        s,
        "    fn command_name(&self) -> &'static str {{\n        match self {{"
    );
    for i in 0..PER {
        let _ = writeln!(s, "            Self::Do{i} {{ .. }} => \"Do{i}\",");
    }
    let _ = writeln!(s, "        }}\n    }}");
    let _ = writeln!(
        s,
        "    fn expectation(&self) -> StreamExpectation {{\n        match self {{\n            Self::Do0 {{ .. }} => StreamExpectation::MustNotExist,\n            _ => StreamExpectation::MustExist,\n        }}\n    }}"
    );
    let _ = writeln!(
        s,
        "    fn handle(self, _state: &Agg{k}) -> Result<Vec<Agg{k}Event>, Refused{k}> {{"
    );
    let _ = writeln!(s, "        let (i, n) = match self {{");
    for i in 0..PER {
        let _ = writeln!(s, "            Self::Do{i} {{ n }} => ({i}, n),");
    }
    let _ = writeln!(
        s,
        "        }};\n        if n == u64::MAX {{ return Err(Refused{k}); }}\n        let note = String::new();\n        Ok(vec![match i {{"
    );
    for i in 0..PER {
        let _ = writeln!(
            s,
            "            {i} => Agg{k}Event::Happened{i} {{ n, note }},"
        );
    }
    let _ = writeln!(
        s,
        "            _ => Agg{k}Event::Happened{} {{ n, note }},\n        }}])\n    }}\n}}\n",
        PER - 1
    );
    let _ = writeln!(
        s,
        "#[derive(Debug, Default)]\npub struct Agg{k} {{\n    pub total: u64,\n}}\n"
    );
    let _ = writeln!(
        s,
        "impl Aggregate for Agg{k} {{\n    const NAME: &'static str = \"agg{k}\";\n    type Command = Agg{k}Command;\n    type Event = Agg{k}Event;\n    type Error = Refused{k};\n    fn initial() -> Self {{\n        Self::default()\n    }}\n    fn apply(&mut self, event: &Agg{k}Event) {{\n        match event {{"
    );
    for i in 0..PER {
        let _ = writeln!(
            s,
            "            Agg{k}Event::Happened{i} {{ n, .. }} => self.total += n,"
        );
    }
    let _ = writeln!(s, "        }}\n    }}\n}}");
    s
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
                 cqrs-core = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\
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
    // The dependencies (cqrs-core, serde, ...) once, outside the timings.
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
