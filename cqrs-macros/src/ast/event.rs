//! `#[derive(DomainEvent)]`: the event enum, its variants and their upcasters.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{DeriveInput, Ident, Variant};

use super::{Shape, enum_aggregate, enum_data, method_ident, shape, to_u32};
use crate::attr::{self, Slot};
use crate::ctxt::Ctxt;

/// `#[derive(DomainEvent)]` input.
pub(crate) struct EventEnum<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) aggregate: Option<syn::Type>,
    pub(crate) variants: Vec<EventVariant<'a>>,
}

/// One event variant.
pub(crate) struct EventVariant<'a> {
    pub(crate) ident: &'a Ident,
    /// The variant's attributes (checked for ones the derive would ignore).
    pub(crate) attrs: &'a [syn::Attribute],
    /// The stable type name.
    pub(crate) name: attr::Spanned<String>,
    /// Whether `name` was written, not derived.
    pub(crate) explicit_name: bool,
    pub(crate) version: attr::Spanned<u32>,
    pub(crate) upcasts: Vec<Upcast>,
    pub(crate) apply: Ident,
    pub(crate) shape: Shape<'a>,
    /// `#[pii(subject = field)]` on its fields.
    pub(crate) personal: Vec<Personal<'a>>,
}

/// A field marked `#[pii(subject = other_field)]`.
pub(crate) struct Personal<'a> {
    pub(crate) field: &'a syn::Field,
    pub(crate) subject: Ident,
}

/// `upcast(from = N, with = path)`.
pub(crate) struct Upcast {
    pub(crate) from: attr::Spanned<u32>,
    pub(crate) with: syn::Path,
    /// The `upcast` key.
    pub(crate) span: Span,
}

impl<'a> EventEnum<'a> {
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        let aggregate = enum_aggregate(cx, input, attr::EVENT);
        let variants = enum_data(
            cx,
            input,
            "DomainEvent",
            ("Event", "Created { .. }, Renamed { .. }"),
        )
        .map(|data| {
            data.variants
                .iter()
                .filter_map(|v| EventVariant::from_ast(cx, v))
                .collect()
        })
        .unwrap_or_default();
        Self {
            ident: &input.ident,
            aggregate,
            variants,
        }
    }
}

impl<'a> EventVariant<'a> {
    fn from_ast(cx: &mut Ctxt, variant: &'a Variant) -> Option<Self> {
        let mut name = Slot::new(attr::KEY_NAME);
        let mut version = Slot::new(attr::KEY_VERSION);
        let mut apply = Slot::new(attr::KEY_APPLY);
        let mut upcasts = Vec::new();
        attr::for_each_meta(cx, &variant.attrs, attr::EVENT, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_VERSION.is(meta) {
                let n = attr::parse_int(meta, attr::KEY_VERSION)?;
                let v = to_u32(cx, n, attr::KEY_VERSION);
                version.set(cx, meta, (v, n.1));
            } else if attr::KEY_APPLY.is(meta) {
                let ident = attr::parse_ident(meta, attr::KEY_APPLY)?;
                apply.set(cx, meta, ident);
            } else if attr::KEY_UPCAST.is(meta) {
                if let Some(upcast) = Upcast::parse(cx, meta)? {
                    upcasts.push(upcast);
                }
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[event(...)]` on a variant",
                    &[
                        attr::KEY_NAME,
                        attr::KEY_VERSION,
                        attr::KEY_UPCAST,
                        attr::KEY_APPLY,
                    ],
                ));
            }
            Ok(())
        });
        let shape = shape(cx, variant, "event")?;
        let personal = personal_fields(cx, variant, &shape);
        let variant_name = variant.ident.unraw().to_string();
        let (name, explicit_name) = match name.get() {
            Some(lit) => (
                attr::Spanned {
                    value: lit.value.value(),
                    span: lit.value.span(),
                },
                true,
            ),
            None => (
                attr::Spanned {
                    value: variant_name.clone(),
                    span: variant.ident.span(),
                },
                false,
            ),
        };
        let version = version.get().map_or(
            attr::Spanned {
                value: 1,
                span: variant.ident.span(),
            },
            |s| attr::Spanned {
                value: s.value.0,
                span: s.value.1,
            },
        );
        let apply = match apply.get() {
            Some(s) => s.value,
            None => {
                let snake = heck::ToSnakeCase::to_snake_case(variant_name.as_str());
                method_ident(
                    cx,
                    &format!("apply_{snake}"),
                    variant.ident.span(),
                    attr::KEY_APPLY,
                )?
            }
        };
        Some(Self {
            ident: &variant.ident,
            attrs: &variant.attrs,
            name,
            explicit_name,
            version,
            upcasts,
            apply,
            shape,
            personal,
        })
    }
}

/// The fields of a variant marked `#[pii(subject = ...)]`, checked: a named field of the same
/// variant names the subject, and neither carries `#[serde(...)]` (they are found by their Rust
/// names in the payload).
fn personal_fields<'a>(
    cx: &mut Ctxt,
    variant: &'a Variant,
    shape: &Shape<'a>,
) -> Vec<Personal<'a>> {
    let Shape::Struct(fields) = shape else {
        for field in &variant.fields {
            if let Some(attr) = field.attrs.iter().find(|a| a.path().is_ident(attr::PII)) {
                cx.error_spanned_by(
                    attr,
                    "`#[pii]` marks a field of a variant with named fields: write the variant as `Variant { subject_id: String, #[pii(subject = subject_id)] email: String }`",
                );
            }
        }
        return Vec::new();
    };
    let name_of = |f: &syn::Field| f.ident.as_ref().map(|i| i.unraw().to_string());
    let mut personal = Vec::new();
    for field in fields {
        if let Some(bare) = field
            .attrs
            .iter()
            .find(|a| a.path().is_ident(attr::PII) && matches!(a.meta, syn::Meta::Path(_)))
        {
            cx.error_spanned_by(
                bare,
                "`#[pii]` needs the field naming whose data this is: write #[pii(subject = member_id)]",
            );
            continue;
        }
        let mut subject = Slot::new(attr::KEY_SUBJECT);
        let written = attr::for_each_meta(cx, &field.attrs, attr::PII, |cx, meta| {
            if attr::KEY_SUBJECT.is(meta) {
                let ident = attr::parse_ident(meta, attr::KEY_SUBJECT)?;
                subject.set(cx, meta, ident);
                Ok(())
            } else {
                Err(attr::unknown_key(
                    meta,
                    "`#[pii(...)]`",
                    &[attr::KEY_SUBJECT],
                ))
            }
        });
        let Some(attr_token) = field.attrs.iter().find(|a| a.path().is_ident(attr::PII)) else {
            continue;
        };
        let Some(subject) = subject.get().map(|s| s.value) else {
            if !written.has(attr::KEY_SUBJECT) {
                cx.error_spanned_by(
                    attr_token,
                    "`#[pii]` needs the field naming whose data this is: write #[pii(subject = member_id)]",
                );
            }
            continue;
        };
        let subject_name = subject.unraw().to_string();
        let Some(subject_field) = fields
            .iter()
            .find(|f| name_of(f).as_deref() == Some(subject_name.as_str()))
        else {
            let names: Vec<String> = fields.iter().filter_map(|f| name_of(f)).collect();
            cx.error_spanned_by(
                &subject,
                format_args!(
                    "`{subject_name}` is not a field of this variant: the subject is another field of it ({})",
                    names.join(", ")
                ),
            );
            continue;
        };
        if name_of(subject_field) == name_of(field) {
            cx.error_spanned_by(
                &subject,
                "a personal field cannot be its own subject: name the field holding the person's id, e.g. subject = member_id",
            );
            continue;
        }
        if subject_field
            .attrs
            .iter()
            .any(|a| a.path().is_ident(attr::PII))
        {
            cx.error_spanned_by(
                &subject,
                format_args!("the subject `{subject_name}` is itself marked #[pii]: a subject stays in the clear to find its key, so name an id, not personal data"),
            );
            continue;
        }
        for marked in [*field, *subject_field] {
            if let Some(serde) = marked.attrs.iter().find(|a| a.path().is_ident("serde")) {
                cx.error_spanned_by(
                    serde,
                    "drop `#[serde(...)]` here: a personal field and its subject are found by their Rust names in the stored payload",
                );
            }
        }
        personal.push(Personal { field, subject });
    }
    personal
}

impl Upcast {
    fn parse(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Option<Self>> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(meta.error("expected `upcast(from = <version>, with = <function>)`"));
        }
        let mut from = Slot::new(attr::KEY_FROM);
        let mut with = Slot::new(attr::KEY_WITH);
        meta.parse_nested_meta(|inner| {
            if attr::KEY_FROM.is(&inner) {
                let n = attr::parse_int(&inner, attr::KEY_FROM)?;
                let v = to_u32(cx, n, attr::KEY_FROM);
                from.set(cx, &inner, (v, n.1));
                Ok(())
            } else if attr::KEY_WITH.is(&inner) {
                let path = attr::parse_path(&inner, attr::KEY_WITH)?;
                with.set(cx, &inner, path);
                Ok(())
            } else {
                Err(attr::unknown_key(
                    &inner,
                    "`upcast(...)`",
                    &[attr::KEY_FROM, attr::KEY_WITH],
                ))
            }
        })?;
        let span = meta.path.span();
        match (from.get(), with.get()) {
            (Some(from), Some(with)) => Ok(Some(Self {
                from: attr::Spanned {
                    value: from.value.0,
                    span: from.value.1,
                },
                with: with.value,
                span,
            })),
            (None, _) => {
                cx.error_at(span, "`upcast` needs `from = <version>`: write upcast(from = 1, with = path::to::fn)");
                Ok(None)
            }
            (_, None) => {
                cx.error_at(span, "`upcast` needs `with = <function>`: write upcast(from = 1, with = path::to::fn)");
                Ok(None)
            }
        }
    }
}
