//! The models of the five derives' inputs, one module per derive (mirroring `expand/`): what the
//! user wrote, parsed, with the original nodes kept for spans. Parsing reports every bad attribute
//! into the context and goes on.

mod aggregate;
mod command;
mod event;
mod projection;
mod saga;

pub(crate) use aggregate::{AggregateStruct, AggregateTypes};
pub(crate) use command::{CommandEnum, CommandVariant, Expectation};
pub(crate) use event::{EventEnum, EventVariant};
pub(crate) use projection::ProjectionStruct;
pub(crate) use saga::{SagaEnum, SagaTypes};

/// A derive's input as parsed: complete (every required key written) or incomplete, with what a
/// stub can still be made of (the missing keys are reported while parsing).
pub(crate) enum Parsed<M, S> {
    /// Every required key is there.
    Complete(M),
    /// A required key is missing.
    Incomplete(S),
}

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::{Data, DataEnum, DeriveInput, Field, Fields, Ident, Variant};

use crate::attr::{self, Key, Slot};
use crate::ctxt::Ctxt;

/// The fields of a variant, in the forms the derives support.
pub(crate) enum Shape<'a> {
    /// `Variant`
    Unit,
    /// `Variant(Type)`
    Newtype(&'a syn::Type),
    /// `Variant { a: A, b: B }`
    Struct(Vec<&'a Field>),
}

/// Reads a variant's shape; a tuple variant of several fields is an error (named fields keep a stored
/// payload readable and evolvable).
pub(crate) fn shape<'a>(cx: &mut Ctxt, variant: &'a Variant, what: &str) -> Option<Shape<'a>> {
    match &variant.fields {
        Fields::Unit => Some(Shape::Unit),
        Fields::Named(named) => Some(Shape::Struct(named.named.iter().collect())),
        Fields::Unnamed(unnamed) if unnamed.unnamed.len() == 1 => {
            Some(Shape::Newtype(&unnamed.unnamed[0].ty))
        }
        Fields::Unnamed(unnamed) => {
            let v = variant.ident.unraw();
            cx.error_spanned_by(
                unnamed,
                format_args!(
                    "{what} variants take named fields or one value: write `{v} {{ a: A, b: B }}` or `{v}(Data)`"
                ),
            );
            None
        }
    }
}

/// The enum a derive of enums works on; a struct, a union or generics are errors.
pub(crate) fn enum_data<'a>(
    cx: &mut Ctxt,
    input: &'a DeriveInput,
    derive: &str,
    (suffix, example): (&str, &str),
) -> Option<&'a DataEnum> {
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        cx.error_spanned_by(
            &input.generics,
            format_args!(
                "derive({derive}) does not support generic parameters: use a concrete enum"
            ),
        );
    }
    match &input.data {
        Data::Enum(data) if data.variants.is_empty() => {
            cx.error_spanned_by(
                &input.ident,
                format_args!(
                    "derive({derive}) needs at least one variant: write `enum {} {{ {example} }}`",
                    input.ident
                ),
            );
            None
        }
        Data::Enum(data) => Some(data),
        Data::Struct(data) => {
            cx.error_spanned_by(
                data.struct_token,
                format_args!(
                    "derive({derive}) works on an enum, not a struct: wrap the struct in a variant, `enum {ident}{suffix} {{ {ident}({ident}) }}`"
                ),
            );
            None
        }
        Data::Union(data) => {
            cx.error_spanned_by(
                data.union_token,
                format_args!("derive({derive}) works on an enum, not a union"),
            );
            None
        }
    }
}

/// `Ident::new` refuses keywords: `handler` names derived from variants like `Type` or `Move` become
/// raw identifiers, and the few words that cannot be raw are reported.
pub(crate) fn method_ident(cx: &mut Ctxt, name: &str, span: Span, key: Key) -> Option<Ident> {
    if let Ok(mut ident) = syn::parse_str::<Ident>(name) {
        ident.set_span(span);
        return Some(ident);
    }
    if matches!(name, "self" | "super" | "crate" | "Self" | "_")
        || syn::parse_str::<Ident>(&format!("r#{name}")).is_err()
    {
        cx.error_at(
            span,
            format_args!("the default method name `{name}` is not a valid identifier: name the method with {key} = ..."),
        );
        return None;
    }
    Some(Ident::new_raw(name, span))
}

/// The enum-level `#[event(aggregate = T)]` / `#[command(aggregate = T)]`, the only key there.
pub(crate) fn enum_aggregate(cx: &mut Ctxt, input: &DeriveInput, name: &str) -> Option<syn::Type> {
    let mut aggregate = Slot::new(attr::KEY_AGGREGATE);
    let place = format!("`#[{name}(...)]` on the enum");
    attr::for_each_meta(cx, &input.attrs, name, |cx, meta| {
        if attr::KEY_AGGREGATE.is(meta) {
            let ty = attr::parse_type(cx, meta, attr::KEY_AGGREGATE)?;
            aggregate.set(cx, meta, ty);
            Ok(())
        } else {
            Err(attr::unknown_key(meta, &place, &[attr::KEY_AGGREGATE]))
        }
    });
    aggregate.get().map(|s| s.value)
}

/// A number of a key that must fit `u32`, reported at its span when it does not.
pub(crate) fn to_u32(cx: &mut Ctxt, (n, span): (u64, Span), key: Key) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| {
        cx.error_at(span, format_args!("{key} must fit in 32 bits"));
        1
    })
}
