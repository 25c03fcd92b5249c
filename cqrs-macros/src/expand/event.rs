//! `#[derive(DomainEvent)]`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::{DeriveInput, Ident};

use crate::ast::{EventEnum, EventVariant, Shape};
use crate::ctxt::Ctxt;
use crate::valid;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let model = EventEnum::from_ast(&mut cx, input);
    valid::event_enum(&mut cx, &model);
    let result = cx.check().map(|()| generate(&model));
    super::finish(input, result, || stub(&model))
}

/// Serde attributes of a field, to forward to a helper struct.
fn serde_attrs(field: &syn::Field) -> impl Iterator<Item = &syn::Attribute> {
    field.attrs.iter().filter(|a| a.path().is_ident("serde"))
}

fn helper_ident(prefix: &str, variant: &Ident) -> Ident {
    format_ident!("__Cqrs{}{}", prefix, variant.unraw())
}

fn generate(model: &EventEnum<'_>) -> TokenStream {
    let ident = model.ident;
    let names: Vec<&String> = model.variants.iter().map(|v| &v.name.value).collect();
    let type_arms = model.variants.iter().map(|v| {
        let (variant, name) = (v.ident, &v.name.value);
        quote!(Self::#variant { .. } => #name,)
    });
    let version_arms = model.variants.iter().map(|v| {
        let (variant, version) = (v.ident, v.version.value);
        quote!(Self::#variant { .. } => #version,)
    });
    let helpers = model.variants.iter().map(helper_structs);
    let encode_arms = model.variants.iter().map(encode_arm);
    let decode_arms = model.variants.iter().map(decode_arm);
    let decode_json_arms = model.variants.iter().map(decode_json_arm);
    let apply = model
        .aggregate
        .as_ref()
        .map(|aggregate| apply_impl(model, aggregate));
    let aggregate_type = model.aggregate.as_ref().map(|aggregate| {
        quote! {
            const AGGREGATE_TYPE: ::core::option::Option<&'static str> =
                ::core::option::Option::Some(<#aggregate as __evently::Aggregate>::NAME);
        }
    });
    // One placeholder function per personal field (its type's default, as JSON), and the table.
    let mut placeholders = Vec::new();
    let mut personal = Vec::new();
    for v in &model.variants {
        for (n, p) in v.personal.iter().enumerate() {
            let ty = &p.field.ty;
            let field = p
                .field
                .ident
                .as_ref()
                .map(|i| i.unraw().to_string())
                .unwrap_or_default();
            let subject = p.subject.unraw().to_string();
            let event_type = &v.name.value;
            let f = format_ident!("__evently_forgotten_{}_{}", v.ident, n);
            let value = quote_spanned! {syn::spanned::Spanned::span(ty)=>
                __evently::__private::forgotten::<#ty>()
            };
            placeholders.push(quote! {
                fn #f() -> __evently::__private::serde_json::Value { #value }
            });
            personal.push(quote! {
                __evently::personal::PersonalField {
                    event_type: #event_type,
                    field: #field,
                    subject: #subject,
                    forgotten: #f,
                }
            });
        }
    }
    let personal_fields = (!personal.is_empty()).then(|| {
        quote! {
            const PERSONAL_FIELDS: &'static [__evently::personal::PersonalField] = &[#(#personal),*];
        }
    });
    quote! {
        #[doc(hidden)]
        #[allow(non_camel_case_types, non_snake_case, clippy::all, clippy::pedantic)]
        const _: () = {
            #(#helpers)*
            #(#placeholders)*

            #[automatically_derived]
            impl __evently::DomainEvent for #ident {
                const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];
                #aggregate_type
                #personal_fields

                fn event_type(&self) -> &'static str {
                    match self { #(#type_arms)* }
                }

                fn schema_version(&self) -> u32 {
                    match self { #(#version_arms)* }
                }

                fn encode(&self) -> ::core::result::Result<__evently::EncodedEvent, __evently::event::EncodeError> {
                    ::core::result::Result::Ok(match self { #(#encode_arms)* })
                }

                fn decode(
                    event_type: &str,
                    schema_version: u32,
                    payload: &__evently::__private::serde_json::Value,
                ) -> ::core::result::Result<Self, __evently::DecodeError> {
                    match event_type {
                        #(#decode_arms)*
                        __other => ::core::result::Result::Err(
                            __evently::__private::unknown_type(__other, <Self as __evently::DomainEvent>::EVENT_TYPES),
                        ),
                    }
                }

                fn decode_json(
                    event_type: &str,
                    schema_version: u32,
                    json: &str,
                ) -> ::core::result::Result<Self, __evently::DecodeError> {
                    match event_type {
                        #(#decode_json_arms)*
                        _ => {
                            let __value = __evently::__private::parse_json(event_type, schema_version, json)?;
                            <Self as __evently::DomainEvent>::decode(event_type, schema_version, &__value)
                        }
                    }
                }
            }

            #apply
        };
    }
}

/// For a struct variant: a serializer over references to the fields and an owned deserializer, both
/// carrying the fields' `#[serde(..)]` attributes.
fn helper_structs(v: &EventVariant<'_>) -> TokenStream {
    let Shape::Struct(fields) = &v.shape else {
        return TokenStream::new();
    };
    let ser = helper_ident("Ser", v.ident);
    let de = helper_ident("De", v.ident);
    let ser_fields = fields.iter().map(|f| {
        let (name, ty, attrs) = (&f.ident, &f.ty, serde_attrs(f));
        quote!(#(#attrs)* #name: &'__cqrs #ty,)
    });
    let de_fields = fields.iter().map(|f| {
        let (name, ty, attrs) = (&f.ident, &f.ty, serde_attrs(f));
        quote!(#(#attrs)* #name: #ty,)
    });
    quote! {
        #[derive(__evently::__private::serde::Serialize)]
        #[serde(crate = "__evently::__private::serde")]
        struct #ser<'__cqrs> { #(#ser_fields)* }

        #[derive(__evently::__private::serde::Deserialize)]
        #[serde(crate = "__evently::__private::serde")]
        struct #de { #(#de_fields)* }
    }
}

fn encode_arm(v: &EventVariant<'_>) -> TokenStream {
    let (variant, name, version) = (v.ident, &v.name.value, v.version.value);
    let (pattern, payload) = match &v.shape {
        Shape::Unit => (
            quote!(Self::#variant),
            quote!(__evently::__private::serde_json::Value::Object(
                __evently::__private::serde_json::Map::new()
            )),
        ),
        Shape::Newtype(_) => (
            quote!(Self::#variant(__value)),
            quote!(__evently::__private::encode_payload(#name, __value)?),
        ),
        Shape::Struct(fields) => {
            let ser = helper_ident("Ser", v.ident);
            let names: Vec<_> = fields.iter().map(|f| &f.ident).collect();
            (
                quote!(Self::#variant { #(#names),* }),
                quote!(__evently::__private::encode_payload(#name, &#ser { #(#names),* })?),
            )
        }
    };
    quote! {
        #pattern => __evently::EncodedEvent {
            event_type: #name,
            schema_version: #version,
            payload: #payload,
        },
    }
}

fn decode_arm(v: &EventVariant<'_>) -> TokenStream {
    let (name, current) = (&v.name.value, v.version.value);
    let mut upcasts: Vec<_> = v.upcasts.iter().collect();
    upcasts.sort_by_key(|u| u.from.value);
    let oldest = upcasts.first().map_or(current, |u| u.from.value);
    let chain = upcasts.iter().map(|u| {
        let (from, with) = (u.from.value, &u.with);
        let with = quote_spanned!(u.span=> #with);
        quote! {
            if __found <= #from {
                __value = __evently::__private::upcast(#name, #from, #with, __value)?;
            }
        }
    });
    let upcast_arm = (!upcasts.is_empty()).then(|| {
        quote! {
            __found if __found >= #oldest && __found < #current => {
                let mut __value = ::core::clone::Clone::clone(payload);
                #(#chain)*
                __upcasted = __value;
                &__upcasted
            }
        }
    });
    let build = build_variant(v, &quote!(__evently::__private::decode_payload));
    quote! {
        #name => {
            let __upcasted: __evently::__private::serde_json::Value;
            let __payload: &__evently::__private::serde_json::Value = match schema_version {
                #current => payload,
                #upcast_arm
                __found => {
                    return ::core::result::Result::Err(
                        __evently::__private::unsupported_version(#name, __found, #oldest, #current),
                    );
                }
            };
            ::core::result::Result::Ok({ #build })
        }
    }
}

/// Builds the variant from `__payload` with `decoder` (from a JSON value or from JSON text).
fn build_variant(v: &EventVariant<'_>, decoder: &TokenStream) -> TokenStream {
    let (variant, name, current) = (v.ident, &v.name.value, v.version.value);
    match &v.shape {
        Shape::Unit => quote! {
            let _: __evently::__private::serde::de::IgnoredAny = #decoder(#name, #current, __payload)?;
            Self::#variant
        },
        Shape::Newtype(_) => quote! {
            Self::#variant(#decoder(#name, #current, __payload)?)
        },
        Shape::Struct(fields) => {
            let de = helper_ident("De", v.ident);
            let names: Vec<_> = fields.iter().map(|f| &f.ident).collect();
            quote! {
                let __fields: #de = #decoder(#name, #current, __payload)?;
                Self::#variant { #(#names: __fields.#names),* }
            }
        }
    }
}

/// `decode_json`: a payload of the current version is deserialized straight from its JSON text; an
/// older one (which needs upcasting) or an unknown type goes through `decode`.
fn decode_json_arm(v: &EventVariant<'_>) -> TokenStream {
    let (name, current) = (&v.name.value, v.version.value);
    let build = build_variant(v, &quote!(__evently::__private::decode_payload_str));
    quote! {
        #name if schema_version == #current => {
            let __payload: &str = json;
            ::core::result::Result::Ok({ #build })
        }
    }
}

fn apply_impl(model: &EventEnum<'_>, aggregate: &syn::Type) -> TokenStream {
    let ident = model.ident;
    let arms = model.variants.iter().map(|v| {
        super::dispatch_arm(
            v.ident,
            &v.shape,
            aggregate,
            &v.apply,
            &super::Handler::Apply,
        )
    });
    quote! {
        #[automatically_derived]
        impl __evently::ApplyTo<#aggregate> for #ident {
            fn apply_to(&self, __aggregate: &mut #aggregate) {
                match self { #(#arms)* }
            }
        }
    }
}

/// Emitted with the errors: keeps uses of the enum from failing too.
fn stub(model: &EventEnum<'_>) -> TokenStream {
    let ident = model.ident;
    let apply = model.aggregate.as_ref().map(|aggregate| {
        quote! {
            impl __evently::ApplyTo<#aggregate> for #ident {
                fn apply_to(&self, _: &mut #aggregate) {}
            }
        }
    });
    quote! {
        const _: () = {
            impl __evently::DomainEvent for #ident {
                const EVENT_TYPES: &'static [&'static str] = &[];
                fn event_type(&self) -> &'static str { "" }
                fn schema_version(&self) -> u32 { 0 }
                fn encode(&self) -> ::core::result::Result<__evently::EncodedEvent, __evently::event::EncodeError> {
                    ::core::unreachable!()
                }
                fn decode(
                    _: &str,
                    _: u32,
                    _: &__evently::__private::serde_json::Value,
                ) -> ::core::result::Result<Self, __evently::DecodeError> {
                    ::core::unreachable!()
                }
            }
            #apply
        };
    }
}
