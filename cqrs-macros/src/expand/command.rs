//! `#[derive(Command)]`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;
use syn::ext::IdentExt;

use crate::ast::{CommandEnum, Expectation};
use crate::ctxt::Ctxt;
use crate::valid;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let Some(model) = CommandEnum::from_ast(&mut cx, input) else {
        // No aggregate (its error is in `cx`): nothing to fill a stub with.
        return super::finish(
            input,
            cx.check().map(|()| TokenStream::new()),
            TokenStream::new,
        );
    };
    valid::command(&mut cx, &model);
    let result = cx.check().map(|()| generate(&model));
    super::finish(input, result, || stub(&model))
}

fn generate(model: &CommandEnum<'_>) -> TokenStream {
    let ident = model.ident;
    let aggregate = &model.aggregate;
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
        quote!(Self::#variant { .. } => __evently::StreamExpectation::#expectation,)
    });
    let handle_arms = model.variants.iter().map(|v| {
        // A missing handler, or one of another signature than the declared
        // `fn(&self, fields..) -> Result<Vec<Event>, Error>`, is reported at the handler's name.
        super::dispatch_arm(
            v.ident,
            &v.shape,
            aggregate,
            &v.handler,
            &super::Handler::Command,
        )
    });
    quote! {
        #[automatically_derived]
        impl __evently::Command for #ident {
            type Aggregate = #aggregate;

            fn command_name(&self) -> &'static str {
                match self { #(#name_arms)* }
            }

            fn expectation(&self) -> __evently::StreamExpectation {
                match self { #(#expectation_arms)* }
            }

            fn handle(
                self,
                __aggregate: &#aggregate,
            ) -> ::core::result::Result<
                ::std::vec::Vec<<#aggregate as __evently::Aggregate>::Event>,
                <#aggregate as __evently::Aggregate>::Error,
            > {
                match self { #(#handle_arms)* }
            }
        }
    }
}

/// Emitted with the errors when the aggregate is known: keeps uses of the enum from failing too.
fn stub(model: &CommandEnum<'_>) -> TokenStream {
    let ident = model.ident;
    let aggregate = &model.aggregate;
    quote! {
        impl __evently::Command for #ident {
            type Aggregate = #aggregate;
            fn command_name(&self) -> &'static str { "" }
            fn expectation(&self) -> __evently::StreamExpectation {
                __evently::StreamExpectation::Any
            }
            fn handle(
                self,
                _: &#aggregate,
            ) -> ::core::result::Result<
                ::std::vec::Vec<<#aggregate as __evently::Aggregate>::Event>,
                <#aggregate as __evently::Aggregate>::Error,
            > {
                ::core::unreachable!()
            }
        }
    }
}
