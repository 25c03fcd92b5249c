//! Code generation. Every path is absolute (`::cqrs_core::...`, `::core::...`) and every trait method
//! is called in fully qualified form, so the output compiles whatever the user's module shadows.

pub(crate) mod aggregate;
pub(crate) mod command;
pub(crate) mod event;
pub(crate) mod projection;
pub(crate) mod saga;

use proc_macro2::{Ident, TokenStream};
use quote::{quote, quote_spanned};

use crate::ast::Shape;

/// The derive's output: the generated code, or the errors plus a stub impl so the user sees these
/// errors and not a cascade of "trait not implemented" from every use of the type. A generic type
/// gets no stub: its error says generics are not supported, and a stub without them would not fit.
fn finish(
    input: &syn::DeriveInput,
    result: syn::Result<TokenStream>,
    stub: impl FnOnce() -> TokenStream,
) -> TokenStream {
    match result {
        Ok(tokens) => tokens,
        Err(error) => {
            let mut tokens = error.to_compile_error();
            if input.generics.params.is_empty() {
                tokens.extend(stub());
            }
            tokens
        }
    }
}

/// `Self::Variant { a, b } => <Aggregate>::method(__aggregate, a, b),` for every shape: the fields
/// become arguments (by value for commands, by reference for events, as the match binds them). The
/// call is spanned at the variant, so a missing method or a type mismatch is reported there.
fn dispatch_arm(
    variant: &Ident,
    shape: &Shape<'_>,
    aggregate: &syn::Type,
    method: &Ident,
) -> TokenStream {
    let (pattern, args) = match shape {
        Shape::Unit => (quote!(Self::#variant), quote!()),
        Shape::Newtype => (quote!(Self::#variant(__value)), quote!(, __value)),
        Shape::Struct(fields) => {
            let names: Vec<_> = fields.iter().map(|f| &f.ident).collect();
            (quote!(Self::#variant { #(#names),* }), quote!(#(, #names)*))
        }
    };
    let call = quote_spanned!(variant.span()=> <#aggregate>::#method(__aggregate #args));
    quote!(#pattern => #call,)
}
