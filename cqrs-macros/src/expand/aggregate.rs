//! `#[derive(Aggregate)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned;

use crate::ast::AggregateStruct;
use crate::ctxt::Ctxt;
use crate::valid;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let model = AggregateStruct::from_ast(&mut cx, input);
    valid::aggregate(&mut cx, &model);
    let result = cx.check().and_then(|()| generate(&model));
    super::finish(result, stub(&model))
}

fn generate(model: &AggregateStruct<'_>) -> syn::Result<TokenStream> {
    let ident = model.ident;
    let (Some(name), Some(command), Some(event), Some(error)) =
        (&model.name, &model.command, &model.event, &model.error)
    else {
        return Err(syn::Error::new_spanned(
            ident,
            "derive(Aggregate) needs name, command, event and error",
        ));
    };
    let name = &name.value;
    let snapshot = model.snapshot.as_ref().map(|s| {
        let (every, version) = (s.every.value, s.version.value);
        quote!(const SNAPSHOT: ::cqrs_core::SnapshotPolicy = ::cqrs_core::SnapshotPolicy::every(#every, #version);)
    });
    // Spanned at the user's types: "does not apply", "is not a command of" and "is not an error"
    // are reported on the type named in the attribute.
    let apply = quote_spanned! {event.span()=>
        <#event as ::cqrs_core::ApplyTo<Self>>::apply_to(event, self)
    };
    let command_check = quote_spanned! {command.span()=>
        ::cqrs_core::__private::assert_command_of::<#command, #ident>();
    };
    let error_check = quote_spanned! {error.span()=>
        ::cqrs_core::__private::assert_error::<#error>();
    };
    Ok(quote! {
        #[automatically_derived]
        impl ::cqrs_core::Aggregate for #ident {
            const NAME: &'static str = #name;
            #snapshot
            type Command = #command;
            type Event = #event;
            type Error = #error;

            fn apply(&mut self, event: &#event) {
                #apply
            }
        }

        const _: () = {
            #command_check
            #error_check
        };
    })
}

/// Emitted with the errors when the types are known: keeps uses of the aggregate from failing too.
fn stub(model: &AggregateStruct<'_>) -> TokenStream {
    let ident = model.ident;
    let (Some(command), Some(event), Some(error)) = (&model.command, &model.event, &model.error)
    else {
        return TokenStream::new();
    };
    quote! {
        impl ::cqrs_core::Aggregate for #ident {
            const NAME: &'static str = "";
            type Command = #command;
            type Event = #event;
            type Error = #error;
            fn apply(&mut self, _: &#event) {}
        }
    }
}
