//! `cqrs new aggregate`: a module with an aggregate, its commands, events, error and
//! given/when/then tests, from `templates/aggregate.rs` (the template `examples/src/ticket.rs`
//! was made from).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use heck::{ToSnakeCase, ToUpperCamelCase};

use crate::Failure;

/// The template; `__Name__`, `__name__` and `__label__` stand for the aggregate's type name, its
/// snake-case name and its name in words.
const TEMPLATE: &str = include_str!("../templates/aggregate.rs");

/// Names the generated module cannot take: Rust keywords, and the derives and traits the module
/// imports from the prelude.
const RESERVED: &[&str] = &[
    "as",
    "async",
    "await",
    "box",
    "break",
    "const",
    "continue",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "priv",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "union",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
    "aggregate",
    "command",
    "domain_event",
    "projection",
    "saga",
    "handles",
    "query",
];

/// A rendered aggregate module.
#[derive(Debug)]
pub struct Module {
    /// The type name, e.g. `SupportTicket`.
    pub type_name: String,
    /// The module (and file) name, e.g. `support_ticket`.
    pub module: String,
    /// The code.
    pub code: String,
}

/// Renders the module of aggregate `name` (`SupportTicket` or `support_ticket`).
///
/// # Errors
/// A name that is not an identifier made of ASCII letters, digits and underscores starting with
/// a letter, or one the module cannot take.
pub fn render(name: &str) -> Result<Module, String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "`{name}` is not an aggregate name: use letters and digits, starting with a letter (e.g. `SupportTicket`)"
        ));
    }
    let type_name = name.to_upper_camel_case();
    let module = type_name.to_snake_case();
    if RESERVED.contains(&module.as_str()) {
        return Err(format!(
            "`{name}` cannot be an aggregate name: `{module}` is a Rust keyword or a name the module imports; pick a domain word (e.g. `{type_name}Record`)"
        ));
    }
    let label = module.replace('_', " ");
    let code = TEMPLATE
        .replace("__Name__", &type_name)
        .replace("__name__", &module)
        .replace("__label__", &label);
    Ok(Module {
        type_name,
        module,
        code,
    })
}

/// What [`write`](fn@write) did.
#[derive(Debug)]
pub struct Written {
    /// The module.
    pub module: Module,
    /// The file written.
    pub file: PathBuf,
    /// The crate root a `mod` line was added to, if one was found without it.
    pub registered_in: Option<PathBuf>,
}

/// Writes the module of aggregate `name` into directory `dir` and declares it in `dir/lib.rs` or
/// `dir/main.rs` when one exists and does not declare it yet.
///
/// # Errors
/// A bad name, an existing file (never overwritten), a directory that cannot be written.
pub fn write(name: &str, dir: &Path) -> Result<Written, String> {
    let module = render(name)?;
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory (give the crate's source directory with --path)",
            dir.display()
        ));
    }
    let file = dir.join(format!("{}.rs", module.module));
    if file.exists() {
        return Err(format!(
            "{} exists already; not overwritten",
            file.display()
        ));
    }
    std::fs::write(&file, &module.code)
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let mut registered_in = None;
    for (root, declaration) in [
        ("lib.rs", format!("pub mod {};", module.module)),
        ("main.rs", format!("mod {};", module.module)),
    ] {
        let root = dir.join(root);
        let Ok(text) = std::fs::read_to_string(&root) else {
            continue;
        };
        let declared = text.lines().any(|line| {
            let line = line.trim();
            line == declaration || line == format!("mod {};", module.module)
        });
        if !declared {
            let separator = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            std::fs::write(&root, format!("{text}{separator}{declaration}\n"))
                .map_err(|e| format!("cannot write {}: {e}", root.display()))?;
            registered_in = Some(root);
        }
        break;
    }
    Ok(Written {
        module,
        file,
        registered_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in `examples/src/ticket.rs` is this template's output: they cannot drift.
    #[test]
    fn the_example_is_the_template_rendered() {
        let rendered = render("Ticket").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rendered.code, include_str!("../../examples/src/ticket.rs"));
    }

    #[test]
    fn names_are_normalised_and_checked() {
        let m = render("support_ticket").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (m.type_name.as_str(), m.module.as_str()),
            ("SupportTicket", "support_ticket")
        );
        assert!(m.code.contains("pub struct SupportTicket {"));
        assert!(
            m.code
                .contains("fn apply_support_ticket_opened(&mut self, name: &str)")
        );
        assert!(m.code.contains("#[aggregate(name = \"support_ticket\""));
        assert!(m.code.contains("a support ticket needs a name"));
        assert!(!m.code.contains("__"));
        for bad in ["", "9lives", "has-dash", "naïve", "a b"] {
            let error = render(bad)
                .err()
                .unwrap_or_else(|| panic!("`{bad}` accepted"));
            assert!(error.contains("is not an aggregate name"), "{error}");
        }
        for reserved in ["Type", "match", "Projection", "Saga"] {
            let error = render(reserved)
                .err()
                .unwrap_or_else(|| panic!("`{reserved}` accepted"));
            assert!(error.contains("cannot be an aggregate name"), "{error}");
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum New {
    /// A module with an aggregate, its commands, events, error and given/when/then tests.
    Aggregate {
        /// The aggregate's name, e.g. `SupportTicket` (or `support_ticket`).
        name: String,
        /// The source directory to write `<name>.rs` into; a `lib.rs` or `main.rs` there gets
        /// the `mod` line.
        #[arg(long, default_value = "src")]
        path: PathBuf,
    },
}

pub(crate) fn new_aggregate(name: &str, path: &Path) -> Result<(), Failure> {
    let written = write(name, path)?;
    // Best effort: the template is formatted for typical names; long ones may wrap differently.
    let formatted = std::process::Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(&written.file)
        .status()
        .is_ok_and(|s| s.success());
    let module = &written.module;
    out!(
        "wrote {} (aggregate `{}`: 3 commands, 3 events, their tests){}",
        written.file.display(),
        module.type_name,
        if formatted {
            ""
        } else {
            "; rustfmt was not run"
        }
    );
    match &written.registered_in {
        Some(root) => out!("declared `mod {}` in {}", module.module, root.display()),
        None => out!(
            "declare it in your crate root: `pub mod {};` (if not done yet)",
            module.module
        ),
    }
    out!(
        "the crate needs: evently and thiserror in [dependencies]; then `cargo test {}`",
        module.module
    );
    Ok(())
}
