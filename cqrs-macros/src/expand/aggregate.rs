//! `#[derive(Aggregate)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned;

use crate::ast::{AggregateStruct, AggregateTypes, Parsed};
use crate::ctxt::Ctxt;
use crate::valid;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    match AggregateStruct::from_ast(&mut cx, input) {
        Parsed::Complete(model) => {
            valid::aggregate(&mut cx, &model);
            let result = cx.check().map(|()| generate(&model));
            super::finish(input, result, || {
                stub(model.ident, &model.command, &model.event, &model.error)
            })
        }
        // A required key is missing: `cx` holds its error.
        Parsed::Incomplete(AggregateTypes {
            command,
            event,
            error,
        }) => super::finish(input, cx.check().map(|()| TokenStream::new()), || {
            match (command, event, error) {
                (Some(command), Some(event), Some(error)) => {
                    stub(&input.ident, &command, &event, &error)
                }
                _ => TokenStream::new(),
            }
        }),
    }
}

fn generate(model: &AggregateStruct<'_>) -> TokenStream {
    let ident = model.ident;
    let (command, event, error) = (&model.command, &model.event, &model.error);
    let name = &model.name.value;
    let snapshot = model.snapshot.as_ref().map(|s| {
        let (every, version) = (s.every.value, s.version.value);
        quote!(const SNAPSHOT: __evently::SnapshotPolicy = __evently::SnapshotPolicy::every(#every, #version);)
    });
    // A snapshotted state is stored as JSON: not serializable is an error on `snapshot`, not
    // later where `with_snapshots` is called.
    let snapshot_state = model.snapshot.as_ref().map(|s| {
        // The state's name re-spanned too: the error lands on `snapshot`, not on the struct.
        let mut state = ident.clone();
        state.set_span(s.span);
        let check = quote_spanned!(s.span=> __evently::__private::snapshot_state::<#state>());
        quote! {
            const _: fn() = || {
                #check;
            };
        }
    });
    // Spanned at the user's tokens: a missing `Default` is reported on the aggregate's name, a
    // missing event application on the event type named in the attribute. The associated types'
    // bounds ("is not a command", "is not an error") are reported on those types by the compiler.
    let initial = quote_spanned!(ident.span()=> <Self as ::core::default::Default>::default());
    let apply =
        quote_spanned!(event.span()=> <#event as __evently::ApplyTo<Self>>::apply_to(event, self));
    quote! {
        #[automatically_derived]
        impl __evently::Aggregate for #ident {
            const NAME: &'static str = #name;
            #snapshot
            type Command = #command;
            type Event = #event;
            type Error = #error;

            fn initial() -> Self {
                #initial
            }

            fn apply(&mut self, event: &#event) {
                #apply
            }
        }

        #snapshot_state
    }
}

/// Emitted with the errors when the attribute named all three types: keeps every use of the
/// aggregate (the command enum's derive, gateways) from failing too. Without them no stub is better
/// than one with stand-in types, whose mismatches would name types the user never wrote; the uses
/// then report "`X` is not an aggregate" with the same fix as the error above.
fn stub(
    ident: &syn::Ident,
    command: &syn::Type,
    event: &syn::Type,
    error: &syn::Type,
) -> TokenStream {
    quote! {
        impl __evently::Aggregate for #ident {
            const NAME: &'static str = "";
            type Command = #command;
            type Event = #event;
            type Error = #error;
            fn initial() -> Self {
                ::core::unreachable!()
            }
            fn apply(&mut self, _: &#event) {}
        }
    }
}
