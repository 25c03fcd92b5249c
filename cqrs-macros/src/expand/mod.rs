//! Code generation. Every path is absolute (`__evently::...`, `::core::...`) and every trait method
//! is called in fully qualified form, so the output compiles whatever the user's module shadows.

pub(crate) mod aggregate;
pub(crate) mod command;
pub(crate) mod event;
pub(crate) mod projection;
pub(crate) mod saga;

use proc_macro2::{Ident, TokenStream};
use quote::{quote, quote_spanned};

use crate::ast::Shape;

/// The path of the crate the generated code uses: `evently-core` when the user's package depends
/// on it (under whatever name), else the `evently` facade (which re-exports it whole), else
/// `::evently_core` (rustc then says it is unresolved, and the crate docs say what to add).
fn framework() -> TokenStream {
    use proc_macro_crate::{FoundCrate, crate_name};
    let named = |name: String| {
        let ident = Ident::new(&name, proc_macro2::Span::call_site());
        quote!(::#ident)
    };
    match (crate_name("evently-core"), crate_name("evently")) {
        // Inside evently-core (its tests and doctests too): it names itself `evently_core`.
        (Ok(FoundCrate::Itself), _) => quote!(::evently_core),
        (Ok(FoundCrate::Name(name)), _) => named(name),
        // Inside the facade: it names itself `evently`.
        (Err(_), Ok(FoundCrate::Itself)) => quote!(::evently),
        (Err(_), Ok(FoundCrate::Name(name))) => named(name),
        (Err(_), Err(_)) => quote!(::evently_core),
    }
}

/// Places a derive's output in an anonymous constant that binds `__evently` to the framework
/// crate: impls inside it apply everywhere, and nothing it binds leaks into the user's module.
fn in_scope(tokens: TokenStream) -> TokenStream {
    let framework = framework();
    quote! {
        #[doc(hidden)]
        #[allow(unused_qualifications)]
        const _: () = {
            use #framework as __evently;
            #tokens
        };
    }
}

/// The derive's output: the generated code, or the errors plus a stub impl so the user sees these
/// errors and not a cascade of "trait not implemented" from every use of the type. A generic type
/// gets no stub: its error says generics are not supported, and a stub without them would not fit.
fn finish(
    input: &syn::DeriveInput,
    result: syn::Result<TokenStream>,
    stub: impl FnOnce() -> TokenStream,
) -> TokenStream {
    match result {
        Ok(tokens) => in_scope(tokens),
        // The errors stay outside the constant: rustc reports them and stops there, before
        // resolving the stub's paths.
        Err(error) => {
            let mut tokens = error.to_compile_error();
            if input.generics.params.is_empty() {
                tokens.extend(in_scope(stub()));
            }
            tokens
        }
    }
}

/// Which method a dispatch arm calls.
enum Handler {
    /// A command handler: `fn(&self, fields by value..) -> Result<Vec<Event>, Error>`.
    Command,
    /// An event's `apply_*`: `fn(&mut self, &fields..)`.
    Apply,
}

/// `Self::Variant { a, b } => <Aggregate>::method(__aggregate, a, b)` for every shape: the fields
/// become arguments (by value for commands, by reference for events, as the match binds them).
///
/// A command handler is first taken as a function pointer of the expected arguments, at the
/// method's name (the `handler = ...` value, or the variant when the name is derived): a
/// missing method is reported there, and a method of another signature as one "expected fn
/// pointer `fn(&Counter, u32) -> ..`, found fn item `fn(&Counter, u64) -> .. {Counter::increment}`"
/// error, with no follow-on error from the call (which is to the pointer, so it is well typed)
/// and no suggestion to edit generated code. An `apply_*` method is called directly instead, so
/// that deref coercion works as in any call (`fn apply_renamed(&mut self, name: &str)` for a
/// `name: String` field): a pointer of the exact type would refuse it.
fn dispatch_arm(
    variant: &Ident,
    shape: &Shape<'_>,
    aggregate: &syn::Type,
    method: &Ident,
    handler: &Handler,
) -> TokenStream {
    let (pattern, args, types) = match shape {
        Shape::Unit => (quote!(Self::#variant), quote!(), Vec::new()),
        Shape::Newtype(ty) => (
            quote!(Self::#variant(__value)),
            quote!(, __value),
            vec![*ty],
        ),
        Shape::Struct(fields) => {
            let names: Vec<_> = fields.iter().map(|f| &f.ident).collect();
            (
                quote!(Self::#variant { #(#names),* }),
                quote!(#(, #names)*),
                fields.iter().map(|f| &f.ty).collect(),
            )
        }
    };
    // The method is taken as a function pointer of the expected signature at its name (the
    // error for a wrong signature lands there, stating both), then called through it.
    let signature = match handler {
        // The return type is left to the call, which the arm returns: a wrong one is reported
        // there, against `handle`'s declared type (naming the aggregate's types here would
        // repeat "not an aggregate" when it is not one).
        Handler::Command => quote_spanned!(variant.span()=> fn(&#aggregate #(, #types)*) -> _),
        // Each field is passed by reference; the referent is left to the method (`&_`), so
        // `name: &str` for a `String` field is taken as a call takes it, by deref coercion.
        // Arity, `&mut self` and by-reference arguments are checked at the pointer.
        Handler::Apply => {
            let refs = types.iter().map(|_| quote!(&_));
            quote_spanned!(variant.span()=> fn(&mut #aggregate #(, #refs)*))
        }
    };
    let method_path = quote_spanned!(method.span()=> <#aggregate>::#method);
    let call = quote_spanned!(variant.span()=> __method(__aggregate #args));
    quote! {
        #pattern => {
            let __method: #signature = #method_path;
            #call
        }
    }
}
