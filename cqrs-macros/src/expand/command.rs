//! `#[derive(Command)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;
use syn::ext::IdentExt;

use crate::ast::{CommandEnum, Expectation, Shape};
use crate::ctxt::Ctxt;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let model = CommandEnum::from_ast(&mut cx, input);
    let result = cx.check().and_then(|()| generate(&model));
    let stub = if input.generics.params.is_empty() {
        stub(&model)
    } else {
        TokenStream::new()
    };
    super::finish(result, stub)
}

fn generate(model: &CommandEnum<'_>) -> syn::Result<TokenStream> {
    let ident = model.ident;
    let Some(aggregate) = &model.aggregate else {
        return Err(syn::Error::new_spanned(
            ident,
            "derive(Command) needs `#[command(aggregate = ...)]`",
        ));
    };
    let name_arms = model.variants.iter().map(|v| {
        let variant = v.ident;
        let name = variant.unraw().to_string();
        quote!(Self::#variant { .. } => #name,)
    });
    let expectation_arms = model.variants.iter().map(|v| {
        let variant = v.ident;
        let expectation = match v.expectation {
            Expectation::MustExist => quote!(MustExist),
            Expectation::MustNotExist => quote!(MustNotExist),
            Expectation::Any => quote!(Any),
        };
        quote!(Self::#variant { .. } => ::cqrs_core::StreamExpectation::#expectation,)
    });
    let handle_arms = model.variants.iter().map(|v| {
        let (variant, handler) = (v.ident, &v.handler);
        let (pattern, args) = match &v.shape {
            Shape::Unit => (quote!(Self::#variant), quote!()),
            Shape::Newtype => (quote!(Self::#variant(__value)), quote!(, __value)),
            Shape::Struct(fields) => {
                let names: Vec<_> = fields.iter().map(|f| &f.ident).collect();
                (quote!(Self::#variant { #(#names),* }), quote!(#(, #names)*))
            }
        };
        // Spanned at the variant: a missing handler, wrong arguments or a wrong return type (the
        // arm must be the declared `Result<Vec<Event>, Error>`) are reported there.
        let call = quote_spanned!(v.ident.span()=> <#aggregate>::#handler(__aggregate #args));
        quote!(#pattern => #call,)
    });
    Ok(quote! {
        #[automatically_derived]
        impl ::cqrs_core::Command for #ident {
            type Aggregate = #aggregate;

            fn command_name(&self) -> &'static str {
                match self { #(#name_arms)* }
            }

            fn expectation(&self) -> ::cqrs_core::StreamExpectation {
                match self { #(#expectation_arms)* }
            }

            fn handle(
                self,
                __aggregate: &#aggregate,
            ) -> ::core::result::Result<
                ::std::vec::Vec<<#aggregate as ::cqrs_core::Aggregate>::Event>,
                <#aggregate as ::cqrs_core::Aggregate>::Error,
            > {
                match self { #(#handle_arms)* }
            }
        }
    })
}

/// Emitted with the errors when the aggregate is known: keeps uses of the enum from failing too.
fn stub(model: &CommandEnum<'_>) -> TokenStream {
    let ident = model.ident;
    let Some(aggregate) = &model.aggregate else {
        return TokenStream::new();
    };
    quote! {
        impl ::cqrs_core::Command for #ident {
            type Aggregate = #aggregate;
            fn command_name(&self) -> &'static str { "" }
            fn expectation(&self) -> ::cqrs_core::StreamExpectation {
                ::cqrs_core::StreamExpectation::Any
            }
            fn handle(
                self,
                _: &#aggregate,
            ) -> ::core::result::Result<
                ::std::vec::Vec<<#aggregate as ::cqrs_core::Aggregate>::Event>,
                <#aggregate as ::cqrs_core::Aggregate>::Error,
            > {
                ::core::unreachable!()
            }
        }
    }
}
