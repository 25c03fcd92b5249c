//! Code generation. Every path is absolute (`::cqrs_core::...`, `::core::...`) and every trait method
//! is called in fully qualified form, so the output compiles whatever the user's module shadows.

pub(crate) mod aggregate;
pub(crate) mod command;
pub(crate) mod event;

use proc_macro2::TokenStream;

/// The derive's output: the generated code, or the errors plus a stub impl so the user sees these
/// errors and not a cascade of "trait not implemented" from every use of the type.
fn finish(result: syn::Result<TokenStream>, stub: TokenStream) -> TokenStream {
    match result {
        Ok(tokens) => tokens,
        Err(error) => {
            let mut tokens = error.to_compile_error();
            tokens.extend(stub);
            tokens
        }
    }
}
