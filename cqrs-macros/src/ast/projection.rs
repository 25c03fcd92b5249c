//! `#[derive(Projection)]`: the projection struct and the enums it handles.

use syn::{Data, DeriveInput, Ident};

use super::Parsed;
use crate::attr::{self, Slot};
use crate::ctxt::Ctxt;

/// `#[derive(Projection)]` input.
pub(crate) struct ProjectionStruct<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: attr::Spanned<String>,
    /// The event enums, as written.
    pub(crate) events: Vec<syn::Path>,
    pub(crate) context: Option<syn::Type>,
    /// `version = N`, with the number's span.
    pub(crate) version: Option<attr::Spanned<u64>>,
    /// `tables("...", ...)`: the read model's tables by the names readers use.
    pub(crate) tables: Vec<syn::LitStr>,
    /// `tenants = "all"`: the projection reads every tenant's events.
    pub(crate) all_tenants: bool,
}

impl<'a> ProjectionStruct<'a> {
    /// The model, or, when a required key is missing (reported in `cx`), the context written (a
    /// stub is made of it).
    pub(crate) fn from_ast(
        cx: &mut Ctxt,
        input: &'a DeriveInput,
    ) -> Parsed<Self, Option<syn::Type>> {
        if !input.generics.params.is_empty() {
            cx.error_spanned_by(
                &input.generics,
                "derive(Projection) does not support generic parameters: use a concrete type",
            );
        }
        if let Data::Union(data) = &input.data {
            cx.error_spanned_by(
                data.union_token,
                "derive(Projection) works on a struct or an enum, not a union",
            );
        }
        let mut name = Slot::new(attr::KEY_NAME);
        let mut events: Slot<Vec<syn::Path>> = Slot::new(attr::KEY_EVENTS);
        let mut context = Slot::new(attr::KEY_CONTEXT);
        let mut version = Slot::new(attr::KEY_VERSION);
        let mut tables: Slot<Vec<syn::LitStr>> = Slot::new(attr::KEY_TABLES);
        let mut tenants: Slot<bool> = Slot::new(attr::KEY_TENANTS);
        let written = attr::for_each_meta(cx, &input.attrs, attr::PROJECTION, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_CONTEXT.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_CONTEXT)?;
                context.set(cx, meta, ty);
            } else if attr::KEY_VERSION.is(meta) {
                let (n, span) = attr::parse_int(meta, attr::KEY_VERSION)?;
                version.set(cx, meta, attr::Spanned { value: n, span });
            } else if attr::KEY_TENANTS.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_TENANTS)?;
                let all = match lit.value().as_str() {
                    "each" => false,
                    "all" => true,
                    _ => {
                        return Err(syn::Error::new(
                            lit.span(),
                            "expected tenants = \"each\" (a worker per tenant, the default) or tenants = \"all\" (one read model across every tenant)",
                        ));
                    }
                };
                tenants.set(cx, meta, all);
            } else if attr::KEY_TABLES.is(meta) {
                let list = paren_list::<syn::LitStr>(
                    meta,
                    "expected `tables(\"balances\", ...)`",
                    "expected the tables' names as strings: tables(\"balances\", \"rm.totals\")",
                )?;
                if list.is_empty() {
                    cx.error_spanned_by(
                        &meta.path,
                        "`tables()` is empty: name the read model's tables, tables(\"balances\"), or leave the key out",
                    );
                }
                tables.set(cx, meta, list);
            } else if attr::KEY_EVENTS.is(meta) {
                let list = paren_list::<syn::Path>(
                    meta,
                    "expected `events(EventEnum, ...)`",
                    "expected the names of event enums: events(OrderEvent, PaymentEvent)",
                )?;
                if list.is_empty() {
                    cx.error_spanned_by(
                        &meta.path,
                        "`events()` is empty: list the event enums this projection handles, events(OrderEvent, ...)",
                    );
                }
                events.set(cx, meta, list);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[projection(...)]`",
                    &[
                        attr::KEY_NAME,
                        attr::KEY_EVENTS,
                        attr::KEY_CONTEXT,
                        attr::KEY_VERSION,
                        attr::KEY_TABLES,
                        attr::KEY_TENANTS,
                    ],
                ));
            }
            Ok(())
        });
        let ident = &input.ident;
        let name = name.get().map(|s| attr::Spanned {
            value: s.value.value(),
            span: s.value.span(),
        });
        let events = events.get().map(|s| s.value);
        if !input
            .attrs
            .iter()
            .any(|a| a.path().is_ident(attr::PROJECTION))
        {
            cx.error_spanned_by(
                ident,
                format_args!("derive(Projection) needs `#[projection(name = \"...\", events(...))]` on `{ident}`"),
            );
        } else {
            if name.is_none() && !written.has(attr::KEY_NAME) {
                cx.error_spanned_by(
                    ident,
                    format_args!("`#[projection(...)]` on `{ident}` is missing name = \"...\""),
                );
            }
            if events.is_none() && !written.has(attr::KEY_EVENTS) {
                cx.error_spanned_by(
                    ident,
                    format_args!(
                        "`#[projection(...)]` on `{ident}` is missing events(EventEnum, ...)"
                    ),
                );
            }
        }
        let context = context.get().map(|s| s.value);
        let version = version.get().map(|s| s.value);
        let tables = tables.get().map(|s| s.value).unwrap_or_default();
        let all_tenants = tenants.get().is_some_and(|s| s.value);
        match (name, events) {
            (Some(name), Some(events)) => Parsed::Complete(Self {
                ident,
                name,
                events,
                context,
                version,
                tables,
                all_tenants,
            }),
            _ => Parsed::Incomplete(context),
        }
    }
}

/// `key(a, b, ...)`: the items, or `no_paren` when the key has no list, `bad_item` (at the item)
/// when an item does not parse.
fn paren_list<T: syn::parse::Parse>(
    meta: &syn::meta::ParseNestedMeta<'_>,
    no_paren: &str,
    bad_item: &str,
) -> syn::Result<Vec<T>> {
    if !meta.input.peek(syn::token::Paren) {
        return Err(meta.error(no_paren));
    }
    let content;
    syn::parenthesized!(content in meta.input);
    Ok(
        syn::punctuated::Punctuated::<T, syn::Token![,]>::parse_terminated(&content)
            .map_err(|e| syn::Error::new(e.span(), bad_item))?
            .into_iter()
            .collect(),
    )
}
