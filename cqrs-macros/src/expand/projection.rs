//! `#[derive(Projection)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned;

use crate::ast::{Parsed, ProjectionStruct};
use crate::ctxt::Ctxt;
use crate::valid;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    match ProjectionStruct::from_ast(&mut cx, input) {
        Parsed::Complete(model) => {
            valid::projection(&mut cx, &model);
            let result = cx.check().map(|()| generate(&model));
            super::finish(input, result, || stub(model.ident, model.context.as_ref()))
        }
        // A required key is missing: `cx` holds its error.
        Parsed::Incomplete(context) => {
            super::finish(input, cx.check().map(|()| TokenStream::new()), || {
                stub(&input.ident, context.as_ref())
            })
        }
    }
}

/// The handlers' context type: `()` unless `context = ...` names one.
fn context(context: Option<&syn::Type>) -> TokenStream {
    context.map_or_else(|| quote!(()), |t| quote!(#t))
}

fn generate(model: &ProjectionStruct<'_>) -> TokenStream {
    let ident = model.ident;
    let version = model.version.as_ref().map_or(1, |v| v.value);
    // Version 1 keeps the plain name (a projection that gains versions keeps its checkpoint);
    // later ones are projections of their own, `name@vN`.
    let name = if version > 1 {
        format!("{}@v{version}", model.name.value)
    } else {
        model.name.value.clone()
    };
    let version = u32::try_from(version).unwrap_or(u32::MAX);
    let tables = &model.tables;
    let tenants = model.all_tenants.then(|| {
        quote!(
            const TENANTS: __evently::tenant::TenantScope = __evently::tenant::TenantScope::All;
        )
    });
    let context = context(model.context.as_ref());
    // Spanned at each enum named in the attribute: "not a domain event" and "has no handler for"
    // are reported on that token.
    let subscriptions = model
        .events
        .iter()
        .map(|e| quote_spanned!(e.span()=> __evently::projection::Subscription::to::<#e>()));
    let routes: Vec<_> = model
        .events
        .iter()
        .map(|e| {
            let call = quote_spanned! {e.span()=>
                __evently::__private::handle::<Self, #e, _>(self, event, context).await
            };
            quote! {
                if __evently::projection::Subscription::to::<#e>().matches(event) {
                    return #call;
                }
            }
        })
        .collect();
    // `apply` and `apply_raw`: the same routes, for either payload.
    let method = |name: TokenStream, event: TokenStream| {
        quote! {
            fn #name<'__cqrs>(
                &'__cqrs mut self,
                event: &'__cqrs #event,
                context: &'__cqrs mut #context,
            ) -> __evently::__private::BoxFuture<
                '__cqrs,
                ::core::result::Result<bool, __evently::projection::ProjectionError>,
            > {
                ::std::boxed::Box::pin(async move {
                    #(#routes)*
                    ::core::result::Result::Ok(false)
                })
            }
        }
    };
    let apply = method(quote!(apply), quote!(__evently::StoredEvent));
    let apply_raw = method(quote!(apply_raw), quote!(__evently::RawStoredEvent));
    quote! {
        #[automatically_derived]
        impl __evently::projection::Projection for #ident {
            const NAME: &'static str = #name;
            type Context = #context;
            const SUBSCRIPTIONS: &'static [__evently::projection::Subscription] = &[#(#subscriptions),*];
            const VERSION: u32 = #version;
            const TABLES: &'static [&'static str] = &[#(#tables),*];
            #tenants

            #apply

            #apply_raw
        }
    }
}

/// Emitted with the errors: keeps uses of the projection from failing too.
fn stub(ident: &syn::Ident, context: Option<&syn::Type>) -> TokenStream {
    let context = self::context(context);
    quote! {
        impl __evently::projection::Projection for #ident {
            const NAME: &'static str = "";
            type Context = #context;
            const SUBSCRIPTIONS: &'static [__evently::projection::Subscription] = &[];
            fn apply<'__cqrs>(
                &'__cqrs mut self,
                _: &'__cqrs __evently::StoredEvent,
                _: &'__cqrs mut #context,
            ) -> __evently::__private::BoxFuture<
                '__cqrs,
                ::core::result::Result<bool, __evently::projection::ProjectionError>,
            > {
                ::std::boxed::Box::pin(async { ::core::result::Result::Ok(false) })
            }
        }
    }
}
