//! `#[derive(Aggregate)]`: the aggregate struct and its snapshot policy.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Ident};

use super::{Parsed, to_u32};
use crate::attr::{self, Slot};
use crate::ctxt::Ctxt;

/// `#[derive(Aggregate)]` input.
pub(crate) struct AggregateStruct<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: attr::Spanned<String>,
    pub(crate) command: syn::Type,
    pub(crate) event: syn::Type,
    pub(crate) error: syn::Type,
    pub(crate) snapshot: Option<Snapshot>,
}

/// What was written of the three types when a required key is missing: a stub is made of them
/// when all three are there (see `expand::aggregate`).
pub(crate) struct AggregateTypes {
    pub(crate) command: Option<syn::Type>,
    pub(crate) event: Option<syn::Type>,
    pub(crate) error: Option<syn::Type>,
}

/// `snapshot(every = N, version = V)`.
pub(crate) struct Snapshot {
    /// The `snapshot` key.
    pub(crate) span: Span,
    pub(crate) every: attr::Spanned<u64>,
    pub(crate) version: attr::Spanned<u32>,
}

impl<'a> AggregateStruct<'a> {
    /// The model, or, when a required key is missing (reported in `cx`), the types written.
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Parsed<Self, AggregateTypes> {
        if !input.generics.params.is_empty() {
            cx.error_spanned_by(
                &input.generics,
                "derive(Aggregate) does not support generic parameters: use a concrete type",
            );
        }
        if let Data::Union(data) = &input.data {
            cx.error_spanned_by(
                data.union_token,
                "derive(Aggregate) works on a struct or an enum, not a union",
            );
        }
        let mut name = Slot::new(attr::KEY_NAME);
        let mut command = Slot::new(attr::KEY_COMMAND);
        let mut event = Slot::new(attr::KEY_EVENT);
        let mut error = Slot::new(attr::KEY_ERROR);
        let mut snapshot = Slot::new(attr::KEY_SNAPSHOT);
        let seen = input
            .attrs
            .iter()
            .any(|a| a.path().is_ident(attr::AGGREGATE));
        let written = attr::for_each_meta(cx, &input.attrs, attr::AGGREGATE, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_COMMAND.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_COMMAND)?;
                command.set(cx, meta, ty);
            } else if attr::KEY_EVENT.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_EVENT)?;
                event.set(cx, meta, ty);
            } else if attr::KEY_ERROR.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_ERROR)?;
                error.set(cx, meta, ty);
            } else if attr::KEY_SNAPSHOT.is(meta) {
                if let Some(s) = Snapshot::parse(cx, meta)? {
                    snapshot.set(cx, meta, s);
                }
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[aggregate(...)]`",
                    &[
                        attr::KEY_NAME,
                        attr::KEY_COMMAND,
                        attr::KEY_EVENT,
                        attr::KEY_ERROR,
                        attr::KEY_SNAPSHOT,
                    ],
                ));
            }
            Ok(())
        });
        let name = name.get().map(|s| attr::Spanned {
            value: s.value.value(),
            span: s.value.span(),
        });
        let command = command.get().map(|s| s.value);
        let event = event.get().map(|s| s.value);
        let error = error.get().map(|s| s.value);
        let snapshot = snapshot.get().map(|s| s.value);
        let ident = &input.ident;
        if !seen {
            cx.error_spanned_by(
                ident,
                format_args!(
                    "derive(Aggregate) needs `#[aggregate(name = \"...\", command = ..., event = ..., error = ...)]` on `{ident}`"
                ),
            );
        } else {
            let missing: Vec<&str> = [
                (attr::KEY_NAME, "name = \"...\""),
                (attr::KEY_COMMAND, "command = YourCommand"),
                (attr::KEY_EVENT, "event = YourEvent"),
                (attr::KEY_ERROR, "error = YourError"),
            ]
            .into_iter()
            .filter(|(key, _)| !written.has(*key))
            .map(|(_, example)| example)
            .collect();
            if !missing.is_empty() {
                cx.error_spanned_by(
                    ident,
                    format_args!(
                        "`#[aggregate(...)]` on `{ident}` is missing {}",
                        missing.join(", ")
                    ),
                );
            }
        }
        match (name, command, event, error) {
            (Some(name), Some(command), Some(event), Some(error)) => Parsed::Complete(Self {
                ident,
                name,
                command,
                event,
                error,
                snapshot,
            }),
            (_, command, event, error) => Parsed::Incomplete(AggregateTypes {
                command,
                event,
                error,
            }),
        }
    }
}

impl Snapshot {
    fn parse(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Option<Self>> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(meta.error("expected `snapshot(every = <events>)`"));
        }
        let mut every = Slot::new(attr::KEY_EVERY);
        let mut version = Slot::new(attr::KEY_VERSION);
        meta.parse_nested_meta(|inner| {
            if attr::KEY_EVERY.is(&inner) {
                let n = attr::parse_int(&inner, attr::KEY_EVERY)?;
                every.set(cx, &inner, n);
                Ok(())
            } else if attr::KEY_VERSION.is(&inner) {
                let n = attr::parse_int(&inner, attr::KEY_VERSION)?;
                let v = to_u32(cx, n, attr::KEY_VERSION);
                version.set(cx, &inner, (v, n.1));
                Ok(())
            } else {
                Err(attr::unknown_key(
                    &inner,
                    "`snapshot(...)`",
                    &[attr::KEY_EVERY, attr::KEY_VERSION],
                ))
            }
        })?;
        let span = meta.path.span();
        let Some(every) = every.get() else {
            cx.error_at(
                span,
                "`snapshot` needs `every = <events>`: write snapshot(every = 100)",
            );
            return Ok(None);
        };
        Ok(Some(Self {
            span,
            every: attr::Spanned {
                value: every.value.0,
                span: every.value.1,
            },
            version: version
                .get()
                .map_or(attr::Spanned { value: 1, span }, |s| attr::Spanned {
                    value: s.value.0,
                    span: s.value.1,
                }),
        }))
    }
}
