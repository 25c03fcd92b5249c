//! `#[derive(Command)]`: the command enum and what each variant expects of its stream.

use syn::ext::IdentExt;
use syn::{DeriveInput, Ident, Variant};

use super::{Shape, enum_aggregate, enum_data, method_ident, shape};
use crate::attr::{self, Slot};
use crate::ctxt::Ctxt;

/// `#[derive(Command)]` input.
pub(crate) struct CommandEnum<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) aggregate: syn::Type,
    pub(crate) variants: Vec<CommandVariant<'a>>,
}

/// What a command variant expects of its stream.
#[derive(Clone, Copy)]
pub(crate) enum Expectation {
    MustExist,
    MustNotExist,
    Any,
}

/// One command variant.
pub(crate) struct CommandVariant<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) handler: Ident,
    pub(crate) expectation: Expectation,
    pub(crate) shape: Shape<'a>,
}

impl<'a> CommandEnum<'a> {
    /// The model; `None` when the aggregate is missing (reported in `cx`, as is every bad variant).
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Self> {
        let aggregate = enum_aggregate(cx, input, attr::COMMAND);
        if aggregate.is_none() {
            cx.error_spanned_by(
                &input.ident,
                format_args!(
                    "derive(Command) needs the aggregate that handles these commands: add `#[command(aggregate = YourAggregate)]` to `{}`",
                    input.ident
                ),
            );
        }
        let variants = enum_data(
            cx,
            input,
            "Command",
            ("Command", "Create { .. }, Rename { .. }"),
        )
        .map(|data| {
            data.variants
                .iter()
                .filter_map(|v| CommandVariant::from_ast(cx, v))
                .collect()
        })
        .unwrap_or_default();
        Some(Self {
            ident: &input.ident,
            aggregate: aggregate?,
            variants,
        })
    }
}

impl<'a> CommandVariant<'a> {
    fn from_ast(cx: &mut Ctxt, variant: &'a Variant) -> Option<Self> {
        let mut handler = Slot::new(attr::KEY_HANDLER);
        let mut expectation: Slot<Expectation> = Slot::new(attr::KEY_CREATE);
        attr::for_each_meta(cx, &variant.attrs, attr::COMMAND, |cx, meta| {
            if attr::KEY_HANDLER.is(meta) {
                let ident = attr::parse_ident(meta, attr::KEY_HANDLER)?;
                handler.set(cx, meta, ident);
            } else if attr::KEY_CREATE.is(meta) || attr::KEY_CREATE_OR_UPDATE.is(meta) {
                let (key, value) = if attr::KEY_CREATE.is(meta) {
                    (attr::KEY_CREATE, Expectation::MustNotExist)
                } else {
                    (attr::KEY_CREATE_OR_UPDATE, Expectation::Any)
                };
                attr::parse_flag(meta, key)?;
                if expectation.is_set() {
                    return Err(meta.error(format_args!(
                        "{} and {} exclude each other: keep one",
                        attr::KEY_CREATE,
                        attr::KEY_CREATE_OR_UPDATE
                    )));
                }
                expectation.set(cx, meta, value);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[command(...)]` on a variant",
                    &[
                        attr::KEY_HANDLER,
                        attr::KEY_CREATE,
                        attr::KEY_CREATE_OR_UPDATE,
                    ],
                ));
            }
            Ok(())
        });
        let shape = shape(cx, variant, "command")?;
        let handler = match handler.get() {
            Some(s) => s.value,
            None => {
                let snake =
                    heck::ToSnakeCase::to_snake_case(variant.ident.unraw().to_string().as_str());
                method_ident(cx, &snake, variant.ident.span(), attr::KEY_HANDLER)?
            }
        };
        Some(Self {
            ident: &variant.ident,
            handler,
            expectation: expectation
                .get()
                .map_or(Expectation::MustExist, |s| s.value),
            shape,
        })
    }
}
