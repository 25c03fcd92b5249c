//! Attribute keys and the helpers that parse `#[event(..)]`, `#[command(..)]` and `#[aggregate(..)]`.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned as _;
use syn::{Attribute, Ident, LitInt, LitStr};

use crate::ctxt::Ctxt;

/// One attribute key: its name as written.
#[derive(Clone, Copy)]
pub(crate) struct Key(pub(crate) &'static str);

impl Key {
    pub(crate) fn is(self, meta: &ParseNestedMeta<'_>) -> bool {
        meta.path.is_ident(self.0)
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`", self.0)
    }
}

pub(crate) const EVENT: &str = "event";
pub(crate) const COMMAND: &str = "command";
pub(crate) const AGGREGATE: &str = "aggregate";
pub(crate) const PROJECTION: &str = "projection";
pub(crate) const SAGA: &str = "saga";
pub(crate) const STEP: &str = "step";
pub(crate) const PII: &str = "pii";

// Keys of `#[event(..)]`, `#[command(..)]` and `#[aggregate(..)]`.
pub(crate) const KEY_AGGREGATE: Key = Key("aggregate");
pub(crate) const KEY_NAME: Key = Key("name");
pub(crate) const KEY_VERSION: Key = Key("version");
pub(crate) const KEY_UPCAST: Key = Key("upcast");
pub(crate) const KEY_FROM: Key = Key("from");
pub(crate) const KEY_WITH: Key = Key("with");
pub(crate) const KEY_APPLY: Key = Key("apply");
pub(crate) const KEY_HANDLER: Key = Key("handler");
pub(crate) const KEY_CREATE: Key = Key("create");
pub(crate) const KEY_CREATE_OR_UPDATE: Key = Key("create_or_update");
pub(crate) const KEY_COMMAND: Key = Key("command");
pub(crate) const KEY_EVENT: Key = Key("event");
pub(crate) const KEY_ERROR: Key = Key("error");
pub(crate) const KEY_SNAPSHOT: Key = Key("snapshot");
pub(crate) const KEY_EVERY: Key = Key("every");
pub(crate) const KEY_EVENTS: Key = Key("events");
pub(crate) const KEY_CONTEXT: Key = Key("context");
pub(crate) const KEY_TABLES: Key = Key("tables");
pub(crate) const KEY_TENANTS: Key = Key("tenants");
pub(crate) const KEY_SUBJECT: Key = Key("subject");
pub(crate) const KEY_DATA: Key = Key("data");
pub(crate) const KEY_EXECUTE: Key = Key("execute");
pub(crate) const KEY_COMPENSATE: Key = Key("compensate");
pub(crate) const KEY_RETRY: Key = Key("retry");
pub(crate) const KEY_ATTEMPTS: Key = Key("attempts");
pub(crate) const KEY_BACKOFF_MS: Key = Key("backoff_ms");
pub(crate) const KEY_MAX_DELAY_MS: Key = Key("max_delay_ms");
pub(crate) const KEY_TIMEOUT_MS: Key = Key("timeout_ms");

/// A value parsed from an attribute, with the span of the key for errors.
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// A key that may be given at most once; the second occurrence is the error.
pub(crate) struct Slot<T> {
    key: Key,
    value: Option<Spanned<T>>,
}

impl<T> Slot<T> {
    pub(crate) const fn new(key: Key) -> Self {
        Self { key, value: None }
    }

    /// Stores `value` unless the key was given already, which is reported at the key.
    pub(crate) fn set(&mut self, cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, value: T) {
        if self.value.is_some() {
            cx.error_spanned_by(&meta.path, format_args!("duplicate {} key", self.key));
        } else {
            self.value = Some(Spanned {
                value,
                span: meta.path.span(),
            });
        }
    }

    pub(crate) const fn is_set(&self) -> bool {
        self.value.is_some()
    }

    pub(crate) fn get(self) -> Option<Spanned<T>> {
        self.value
    }
}

/// The keys written in an attribute, parsed or refused.
#[derive(Default)]
pub(crate) struct Written(Vec<String>);

impl Written {
    /// Whether `key` was written (a key refused was reported already: it is not "missing" too).
    pub(crate) fn has(&self, key: Key) -> bool {
        self.0.iter().any(|w| w == key.0)
    }
}

/// Calls `each` for every `key` or `key = value` in every `#[name(..)]` among `attrs`; other
/// attributes are not ours and are left alone. Returns the keys written.
pub(crate) fn for_each_meta(
    cx: &mut Ctxt,
    attrs: &[Attribute],
    name: &str,
    mut each: impl FnMut(&mut Ctxt, &ParseNestedMeta<'_>) -> syn::Result<()>,
) -> Written {
    let mut written = Written::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident(name)) {
        if let syn::Meta::Path(path) = &attr.meta {
            cx.error_spanned_by(
                path,
                format_args!("expected `#[{name}(...)]` with keys inside"),
            );
            continue;
        }
        let mut errors = Vec::new();
        let parsed = attr.parse_nested_meta(|meta| {
            written
                .0
                .extend(meta.path.get_ident().map(ToString::to_string));
            // Errors of one key are collected so the following keys are still checked.
            if let Err(error) = each(cx, &meta) {
                errors.push(error);
                skip_value(&meta);
            }
            Ok(())
        });
        // The derive's own messages first. When a key was refused, what syn says after it
        // ("unexpected token, expected `)`" for the rest of a nested list the key's parser left)
        // follows from the same mistake: it is dropped.
        let refused = !errors.is_empty();
        for error in errors {
            cx.syn_error(error);
        }
        if let Err(error) = parsed
            && !refused
        {
            cx.syn_error(error);
        }
    }
    written
}

/// Consumes what follows a key we rejected, so parsing can go on with the next key.
pub(crate) fn skip_value(meta: &ParseNestedMeta<'_>) {
    if meta.input.peek(syn::Token![=]) {
        let _ = meta.value().and_then(|v| v.parse::<syn::Expr>());
    } else if meta.input.peek(syn::token::Paren) {
        let _ = meta.parse_nested_meta(|inner| {
            skip_value(&inner);
            Ok(())
        });
    } else if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
        // The `=` was consumed already and the value was of the wrong kind.
        let _ = meta.input.parse::<syn::Expr>();
    }
}

/// The error for a key that is not accepted here, listing those that are.
pub(crate) fn unknown_key(meta: &ParseNestedMeta<'_>, place: &str, accepted: &[Key]) -> syn::Error {
    let path = &meta.path;
    let key = quote::quote!(#path).to_string().replace(' ', "");
    let list = accepted
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    meta.error(format_args!(
        "unknown key `{key}` in {place}; expected one of: {list}"
    ))
}

/// `key = "string"`.
pub(crate) fn parse_string(meta: &ParseNestedMeta<'_>, key: Key) -> syn::Result<LitStr> {
    let value = meta.value()?;
    if value.peek(LitStr) {
        value.parse()
    } else {
        Err(value.error(format_args!("expected a string: write {} = \"...\"", key.0)))
    }
}

/// `key = 123` as a `u64`.
pub(crate) fn parse_int(meta: &ParseNestedMeta<'_>, key: Key) -> syn::Result<(u64, Span)> {
    let value = meta.value()?;
    if value.peek(LitInt) {
        let lit: LitInt = value.parse()?;
        let n = lit.base10_parse::<u64>().map_err(|_| {
            syn::Error::new(
                lit.span(),
                format_args!(
                    "expected a whole number of 0 or more, not `{lit}`: write {} = 1",
                    key.0
                ),
            )
        })?;
        Ok((n, lit.span()))
    } else {
        reject_string(value, key, "a whole number")?;
        Err(value.error(format_args!("expected a whole number: write {} = 1", key.0)))
    }
}

/// A string where a Rust item was expected: the error says to drop the quotes.
fn reject_string(value: syn::parse::ParseStream<'_>, key: Key, what: &str) -> syn::Result<()> {
    if value.peek(LitStr) {
        let lit: LitStr = value.parse()?;
        return Err(syn::Error::new(
            lit.span(),
            format_args!(
                "expected {what}, not a string: write {} = {}",
                key.0,
                lit.value()
            ),
        ));
    }
    Ok(())
}

/// `key = Type` (a type path like `OrderEvent` or `crate::order::OrderEvent`).
///
/// A quoted type is reported and then used as if unquoted, so the derive can still emit its stub and
/// the user sees this one error only.
pub(crate) fn parse_type(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    key: Key,
) -> syn::Result<syn::Type> {
    let value = meta.value()?;
    if value.peek(LitStr) {
        let lit: LitStr = value.parse()?;
        cx.error_at(
            lit.span(),
            format_args!(
                "expected a type, not a string: write {} = {}",
                key.0,
                lit.value()
            ),
        );
        return lit.parse();
    }
    value.parse()
}

/// `key = method_name`.
pub(crate) fn parse_ident(meta: &ParseNestedMeta<'_>, key: Key) -> syn::Result<Ident> {
    let value = meta.value()?;
    reject_string(value, key, "a method name")?;
    let ident: Ident = value.call(syn::ext::IdentExt::parse_any)?;
    if value.peek(syn::Token![::]) || value.peek(syn::Token![.]) || value.peek(syn::token::Paren) {
        // `handler = Counter::increment`, `apply = self.apply_x`, `execute = charge()`.
        let rest: proc_macro2::TokenStream = value.parse()?;
        let last = rest
            .into_iter()
            .filter_map(|t| match t {
                proc_macro2::TokenTree::Ident(i) => Some(i),
                _ => None,
            })
            .last()
            .unwrap_or_else(|| ident.clone());
        return Err(syn::Error::new(
            ident.span(),
            format_args!(
                "{key} takes the name of a method, without a path or call: write {} = {last}",
                key.0
            ),
        ));
    }
    Ok(ident)
}

/// `key = path::to::function`.
pub(crate) fn parse_path(meta: &ParseNestedMeta<'_>, key: Key) -> syn::Result<syn::Path> {
    let value = meta.value()?;
    reject_string(value, key, "a function path")?;
    value.parse()
}

/// A bare flag: `key` with nothing after it.
pub(crate) fn parse_flag(meta: &ParseNestedMeta<'_>, key: Key) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) || meta.input.peek(syn::token::Paren) {
        Err(meta.error(format_args!("{key} takes no value: write just {}", key.0)))
    } else {
        Ok(())
    }
}
