//! `#[derive(Saga)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;

use crate::ast::{Parsed, SagaEnum, SagaTypes};
use crate::ctxt::Ctxt;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    match SagaEnum::from_ast(&mut cx, input) {
        Parsed::Complete(model) => {
            crate::valid::saga(&mut cx, &model);
            let result = cx.check().map(|()| generate(&model));
            super::finish(input, result, || {
                stub(model.ident, &model.data, &model.context)
            })
        }
        // A required key is missing: `cx` holds its error.
        Parsed::Incomplete(SagaTypes { data, context }) => {
            super::finish(input, cx.check().map(|()| TokenStream::new()), || {
                match (data, context) {
                    (Some(data), Some(context)) => stub(&input.ident, &data, &context),
                    _ => TokenStream::new(),
                }
            })
        }
    }
}

fn generate(model: &SagaEnum<'_>) -> TokenStream {
    let ident = model.ident;
    let (data, context) = (&model.data, &model.context);
    let name = &model.name.value;
    let specs = model.steps.iter().map(|step| {
        let step_name = &step.name.value;
        let compensable = step.compensate.is_some();
        let retry = match step.retry {
            Some(retry) => {
                let attempts = u32::try_from(retry.attempts.0).unwrap_or(u32::MAX);
                let backoff = retry.backoff_ms.0;
                let max = retry
                    .max_delay_ms
                    .map_or(backoff.saturating_mul(32), |m| m.0);
                quote!(__evently::saga::RetryPolicy {
                    attempts: #attempts,
                    backoff: ::core::time::Duration::from_millis(#backoff),
                    max_delay: ::core::time::Duration::from_millis(#max),
                })
            }
            None => quote!(__evently::saga::RetryPolicy::NONE),
        };
        let timeout = match step.timeout_ms {
            Some((ms, _)) => {
                quote!(::core::option::Option::Some(::core::time::Duration::from_millis(#ms)))
            }
            None => quote!(::core::option::Option::None),
        };
        quote!(__evently::saga::StepSpec {
            name: #step_name,
            compensable: #compensable,
            retry: #retry,
            timeout: #timeout,
        })
    });
    // Each call is spanned at the method's name (the `execute = ...` / `compensate = ...` value,
    // or the variant): a missing method, wrong arguments or a method that is not `async` is
    // reported there. Method-call syntax, so a context behind a smart pointer (`Arc<Services>`)
    // finds the methods of what it points to.
    let call = |index: usize, method: &syn::Ident| {
        // The arguments are placed at the method's name but keep the derive's hygiene, so they
        // count as generated code: rustc reports a wrong argument there without offering to edit
        // the variant ("remove the extra argument", "consider dereferencing"), which is no call.
        let at = proc_macro2::Span::call_site().located_at(method.span());
        let data = quote_spanned!(at=> data);
        let args = quote!(#data, key);
        let call = quote_spanned!(method.span()=> (*context).#method(#args));
        quote! {
            #index => __evently::__private::step(#call),
        }
    };
    let execute_arms = model
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| call(i, &step.execute));
    let compensate_arms = model
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, step)| step.compensate.as_ref().map(|m| call(i, m)));
    let variants = model.steps.iter().map(|step| step.ident);
    // The steps are the table, never values: naming them keeps the enum's variants from being
    // reported as never constructed.
    let execute = step_method(
        &quote!(execute),
        context,
        data,
        &quote!(let _ = [#(Self::#variants),*];),
        execute_arms,
        false,
    );
    let compensate = step_method(
        &quote!(compensate),
        context,
        data,
        &quote!(),
        compensate_arms,
        true,
    );
    quote! {
        #[automatically_derived]
        impl __evently::saga::Saga for #ident {
            const NAME: &'static str = #name;
            const STEPS: &'static [__evently::saga::StepSpec] = &[#(#specs),*];
            type Data = #data;
            type Context = #context;

            #execute
            #compensate
        }
    }
}

/// `fn execute` / `fn compensate`: a match from the step index to the step's call.
fn step_method(
    name: &TokenStream,
    context: &syn::Type,
    data: &syn::Type,
    prelude: &TokenStream,
    arms: impl Iterator<Item = TokenStream>,
    compensate: bool,
) -> TokenStream {
    quote! {
        #[allow(unused_variables)]
        fn #name<'__cqrs>(
            __step: usize,
            context: &'__cqrs #context,
            data: &'__cqrs mut #data,
            key: &'__cqrs __evently::saga::StepKey,
        ) -> __evently::__private::BoxFuture<
            '__cqrs,
            ::core::result::Result<(), __evently::saga::StepError>,
        > {
            #prelude
            match __step {
                #(#arms)*
                _ => ::std::boxed::Box::pin(::core::future::ready(::core::result::Result::Err(
                    __evently::__private::no_such_step(<Self as __evently::saga::Saga>::NAME, __step, #compensate),
                ))),
            }
        }
    }
}

/// Emitted with the errors: keeps uses of the saga from failing too. Without a data or context
/// type there is nothing to fill in, and no stub.
fn stub(ident: &syn::Ident, data: &syn::Type, context: &syn::Type) -> TokenStream {
    // No arms: every index is "no such step" (the stub never runs: the errors stop the build).
    let execute = step_method(
        &quote!(execute),
        context,
        data,
        &quote!(),
        std::iter::empty(),
        false,
    );
    let compensate = step_method(
        &quote!(compensate),
        context,
        data,
        &quote!(),
        std::iter::empty(),
        true,
    );
    quote! {
        impl __evently::saga::Saga for #ident {
            const NAME: &'static str = "";
            const STEPS: &'static [__evently::saga::StepSpec] = &[];
            type Data = #data;
            type Context = #context;
            #execute
            #compensate
        }
    }
}
