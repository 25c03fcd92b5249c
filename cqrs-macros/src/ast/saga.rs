//! `#[derive(Saga)]`: the enum of steps and their retry policies.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, Variant};

use super::{Parsed, enum_data, method_ident};
use crate::attr::{self, Slot};
use crate::ctxt::Ctxt;

/// `#[derive(Saga)]` input: the enum of steps.
pub(crate) struct SagaEnum<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: attr::Spanned<String>,
    pub(crate) data: syn::Type,
    pub(crate) context: syn::Type,
    pub(crate) steps: Vec<SagaStep<'a>>,
}

/// What was written of the two types when a required key is missing: a stub is made of them when
/// both are there (see `expand::saga`).
pub(crate) struct SagaTypes {
    pub(crate) data: Option<syn::Type>,
    pub(crate) context: Option<syn::Type>,
}

/// A step's retry policy as written (milliseconds).
#[derive(Clone, Copy)]
pub(crate) struct Retry {
    pub(crate) attempts: (u64, Span),
    pub(crate) backoff_ms: (u64, Span),
    pub(crate) max_delay_ms: Option<(u64, Span)>,
}

/// One step (a unit variant).
pub(crate) struct SagaStep<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: attr::Spanned<String>,
    pub(crate) execute: Ident,
    pub(crate) compensate: Option<Ident>,
    pub(crate) retry: Option<Retry>,
    pub(crate) timeout_ms: Option<(u64, Span)>,
}

impl<'a> SagaEnum<'a> {
    /// The model, or, when a required key is missing (reported in `cx`), the types written.
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Parsed<Self, SagaTypes> {
        let mut name = Slot::new(attr::KEY_NAME);
        let mut data = Slot::new(attr::KEY_DATA);
        let mut context = Slot::new(attr::KEY_CONTEXT);
        attr::for_each_meta(cx, &input.attrs, attr::SAGA, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_DATA.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_DATA)?;
                data.set(cx, meta, ty);
            } else if attr::KEY_CONTEXT.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_CONTEXT)?;
                context.set(cx, meta, ty);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[saga(...)]`",
                    &[attr::KEY_NAME, attr::KEY_DATA, attr::KEY_CONTEXT],
                ));
            }
            Ok(())
        });
        let ident = &input.ident;
        let name = name.get().map(|s| attr::Spanned {
            value: s.value.value(),
            span: s.value.span(),
        });
        let data = data.get().map(|s| s.value);
        let context = context.get().map(|s| s.value);
        let mut missing = Vec::new();
        if name.is_none() {
            missing.push("name = \"...\"");
        }
        if data.is_none() {
            missing.push("data = YourSagaData");
        }
        if context.is_none() {
            missing.push("context = YourServices");
        }
        if !missing.is_empty() && matches!(input.data, Data::Enum(_)) {
            cx.error_spanned_by(
                ident,
                format_args!(
                    "derive(Saga) needs {} in `#[saga(...)]` on `{ident}`",
                    missing.join(", ")
                ),
            );
        }
        if let Data::Struct(data) = &input.data {
            cx.error_spanned_by(
                data.struct_token,
                format_args!(
                    "derive(Saga) works on an enum of steps, not a struct: write `enum {ident} {{ Reserve, Pay, Ship }}` and put the saga's state in `data = ...`"
                ),
            );
        }
        let steps = (!matches!(input.data, Data::Struct(_)))
            .then(|| enum_data(cx, input, "Saga", ("Steps", "Reserve, Pay, Ship")))
            .flatten()
            .map(|data| {
                data.variants
                    .iter()
                    .filter_map(|v| SagaStep::from_ast(cx, v))
                    .collect()
            })
            .unwrap_or_default();
        match (name, data, context) {
            (Some(name), Some(data), Some(context)) => Parsed::Complete(Self {
                ident,
                name,
                data,
                context,
                steps,
            }),
            (_, data, context) => Parsed::Incomplete(SagaTypes { data, context }),
        }
    }
}

impl<'a> SagaStep<'a> {
    fn from_ast(cx: &mut Ctxt, variant: &'a Variant) -> Option<Self> {
        let mut name = Slot::new(attr::KEY_NAME);
        let mut execute = Slot::new(attr::KEY_EXECUTE);
        let mut compensate: Slot<Option<Ident>> = Slot::new(attr::KEY_COMPENSATE);
        let mut retry = Slot::new(attr::KEY_RETRY);
        let mut timeout = Slot::new(attr::KEY_TIMEOUT_MS);
        attr::for_each_meta(cx, &variant.attrs, attr::STEP, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_EXECUTE.is(meta) {
                let ident = attr::parse_ident(meta, attr::KEY_EXECUTE)?;
                execute.set(cx, meta, ident);
            } else if attr::KEY_COMPENSATE.is(meta) {
                // `compensate` alone: the default method name; `compensate = method` names it.
                let method = if meta.input.peek(syn::Token![=]) {
                    Some(attr::parse_ident(meta, attr::KEY_COMPENSATE)?)
                } else {
                    attr::parse_flag(meta, attr::KEY_COMPENSATE)?;
                    None
                };
                compensate.set(cx, meta, method);
            } else if attr::KEY_TIMEOUT_MS.is(meta) {
                let value = attr::parse_int(meta, attr::KEY_TIMEOUT_MS)?;
                timeout.set(cx, meta, value);
            } else if attr::KEY_RETRY.is(meta) {
                let parsed = Retry::parse(cx, meta)?;
                retry.set(cx, meta, parsed);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[step(...)]`",
                    &[
                        attr::KEY_EXECUTE,
                        attr::KEY_COMPENSATE,
                        attr::KEY_RETRY,
                        attr::KEY_TIMEOUT_MS,
                        attr::KEY_NAME,
                    ],
                ));
            }
            Ok(())
        });
        if !matches!(variant.fields, Fields::Unit) {
            let v = variant.ident.unraw();
            cx.error_spanned_by(
                &variant.fields,
                format_args!(
                    "a saga step is a unit variant (the saga's data is in `data = ...`): write `{v}`"
                ),
            );
            return None;
        }
        let snake = heck::ToSnakeCase::to_snake_case(variant.ident.unraw().to_string().as_str());
        let execute = match execute.get() {
            Some(s) => s.value,
            None => method_ident(cx, &snake, variant.ident.span(), attr::KEY_EXECUTE)?,
        };
        let compensate = match compensate.get() {
            None => None,
            Some(attr::Spanned {
                value: Some(method),
                ..
            }) => Some(method),
            Some(attr::Spanned { value: None, span }) => Some(method_ident(
                cx,
                &format!("compensate_{snake}"),
                span,
                attr::KEY_COMPENSATE,
            )?),
        };
        let name = name.get().map_or_else(
            || attr::Spanned {
                value: snake.clone(),
                span: variant.ident.span(),
            },
            |s| attr::Spanned {
                value: s.value.value(),
                span: s.value.span(),
            },
        );
        Some(Self {
            ident: &variant.ident,
            name,
            execute,
            compensate,
            retry: retry.get().map(|s| s.value),
            timeout_ms: timeout.get().map(|s| s.value),
        })
    }
}

impl Retry {
    /// `retry(attempts = 3, backoff_ms = 100, max_delay_ms = 2000)`.
    fn parse(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Self> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(
                meta.error("expected `retry(attempts = 3, backoff_ms = 100, max_delay_ms = 2000)`")
            );
        }
        let mut attempts = Slot::new(attr::KEY_ATTEMPTS);
        let mut backoff = Slot::new(attr::KEY_BACKOFF_MS);
        let mut max_delay = Slot::new(attr::KEY_MAX_DELAY_MS);
        let span = meta.path.span();
        meta.parse_nested_meta(|inner| {
            if attr::KEY_ATTEMPTS.is(&inner) {
                let value = attr::parse_int(&inner, attr::KEY_ATTEMPTS)?;
                attempts.set(cx, &inner, value);
            } else if attr::KEY_BACKOFF_MS.is(&inner) {
                let value = attr::parse_int(&inner, attr::KEY_BACKOFF_MS)?;
                backoff.set(cx, &inner, value);
            } else if attr::KEY_MAX_DELAY_MS.is(&inner) {
                let value = attr::parse_int(&inner, attr::KEY_MAX_DELAY_MS)?;
                max_delay.set(cx, &inner, value);
            } else {
                // Reported here, so the keys after it are still read.
                cx.syn_error(attr::unknown_key(
                    &inner,
                    "`retry(...)`",
                    &[
                        attr::KEY_ATTEMPTS,
                        attr::KEY_BACKOFF_MS,
                        attr::KEY_MAX_DELAY_MS,
                    ],
                ));
                attr::skip_value(&inner);
            }
            Ok(())
        })?;
        let Some(attempts) = attempts.get() else {
            return Err(syn::Error::new(
                span,
                "`retry(...)` needs `attempts = N` (tries in all, at least 1)",
            ));
        };
        Ok(Self {
            attempts: attempts.value,
            backoff_ms: backoff.get().map_or((100, span), |s| s.value),
            max_delay_ms: max_delay.get().map(|s| s.value),
        })
    }
}
