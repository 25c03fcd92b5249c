//! The models of the three derives' inputs: what the user wrote, parsed, with the original nodes kept
//! for spans. Parsing reports every bad attribute into the context and goes on.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DataEnum, DeriveInput, Field, Fields, Ident, Variant};

use crate::attr::{self, Key, Slot};
use crate::ctxt::Ctxt;

/// The fields of a variant, in the forms the derives support.
pub(crate) enum Shape<'a> {
    /// `Variant`
    Unit,
    /// `Variant(Type)`
    Newtype(&'a syn::Type),
    /// `Variant { a: A, b: B }`
    Struct(Vec<&'a Field>),
}

/// Reads a variant's shape; a tuple variant of several fields is an error (named fields keep a stored
/// payload readable and evolvable).
fn shape<'a>(cx: &mut Ctxt, variant: &'a Variant, what: &str) -> Option<Shape<'a>> {
    match &variant.fields {
        Fields::Unit => Some(Shape::Unit),
        Fields::Named(named) => Some(Shape::Struct(named.named.iter().collect())),
        Fields::Unnamed(unnamed) if unnamed.unnamed.len() == 1 => {
            Some(Shape::Newtype(&unnamed.unnamed[0].ty))
        }
        Fields::Unnamed(unnamed) => {
            let v = variant.ident.unraw();
            cx.error_spanned_by(
                unnamed,
                format_args!(
                    "{what} variants take named fields or one value: write `{v} {{ a: A, b: B }}` or `{v}(Data)`"
                ),
            );
            None
        }
    }
}

/// The enum a derive of enums works on; a struct, a union or generics are errors.
fn enum_data<'a>(
    cx: &mut Ctxt,
    input: &'a DeriveInput,
    derive: &str,
    (suffix, example): (&str, &str),
) -> Option<&'a DataEnum> {
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        cx.error_spanned_by(
            &input.generics,
            format_args!(
                "derive({derive}) does not support generic parameters: use a concrete enum"
            ),
        );
    }
    match &input.data {
        Data::Enum(data) if data.variants.is_empty() => {
            cx.error_spanned_by(
                &input.ident,
                format_args!(
                    "derive({derive}) needs at least one variant: write `enum {} {{ {example} }}`",
                    input.ident
                ),
            );
            None
        }
        Data::Enum(data) => Some(data),
        Data::Struct(data) => {
            cx.error_spanned_by(
                data.struct_token,
                format_args!(
                    "derive({derive}) works on an enum, not a struct: wrap the struct in a variant, `enum {ident}{suffix} {{ {ident}({ident}) }}`"
                ),
            );
            None
        }
        Data::Union(data) => {
            cx.error_spanned_by(
                data.union_token,
                format_args!("derive({derive}) works on an enum, not a union"),
            );
            None
        }
    }
}

/// `Ident::new` refuses keywords: `handler` names derived from variants like `Type` or `Move` become
/// raw identifiers, and the few words that cannot be raw are reported.
pub(crate) fn method_ident(cx: &mut Ctxt, name: &str, span: Span, key: Key) -> Option<Ident> {
    if let Ok(mut ident) = syn::parse_str::<Ident>(name) {
        ident.set_span(span);
        return Some(ident);
    }
    if matches!(name, "self" | "super" | "crate" | "Self" | "_")
        || syn::parse_str::<Ident>(&format!("r#{name}")).is_err()
    {
        cx.error_at(
            span,
            format_args!("the default method name `{name}` is not a valid identifier: name the method with {key} = ..."),
        );
        return None;
    }
    Some(Ident::new_raw(name, span))
}

/// The enum-level `#[event(aggregate = T)]` / `#[command(aggregate = T)]`, the only key there.
fn enum_aggregate(cx: &mut Ctxt, input: &DeriveInput, name: &str) -> Option<syn::Type> {
    let mut aggregate = Slot::new(attr::KEY_AGGREGATE);
    let place = format!("`#[{name}(...)]` on the enum");
    attr::for_each_meta(cx, &input.attrs, name, |cx, meta| {
        if attr::KEY_AGGREGATE.is(meta) {
            let ty = attr::parse_type(cx, meta, attr::KEY_AGGREGATE)?;
            aggregate.set(cx, meta, ty);
            Ok(())
        } else {
            Err(attr::unknown_key(meta, &place, &[attr::KEY_AGGREGATE]))
        }
    });
    aggregate.get().map(|s| s.value)
}

/// `#[derive(DomainEvent)]` input.
pub(crate) struct EventEnum<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) aggregate: Option<syn::Type>,
    pub(crate) variants: Vec<EventVariant<'a>>,
}

/// One event variant.
pub(crate) struct EventVariant<'a> {
    pub(crate) ident: &'a Ident,
    /// The variant's attributes (checked for ones the derive would ignore).
    pub(crate) attrs: &'a [syn::Attribute],
    /// The stable type name.
    pub(crate) name: attr::Spanned<String>,
    /// Whether `name` was written, not derived.
    pub(crate) explicit_name: bool,
    pub(crate) version: attr::Spanned<u32>,
    pub(crate) upcasts: Vec<Upcast>,
    pub(crate) apply: Ident,
    pub(crate) shape: Shape<'a>,
}

/// `upcast(from = N, with = path)`.
pub(crate) struct Upcast {
    pub(crate) from: attr::Spanned<u32>,
    pub(crate) with: syn::Path,
    /// The `upcast` key.
    pub(crate) span: Span,
}

fn to_u32(cx: &mut Ctxt, (n, span): (u64, Span), key: Key) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| {
        cx.error_at(span, format_args!("{key} must fit in 32 bits"));
        1
    })
}

impl<'a> EventEnum<'a> {
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        let aggregate = enum_aggregate(cx, input, attr::EVENT);
        let variants = enum_data(
            cx,
            input,
            "DomainEvent",
            ("Event", "Created { .. }, Renamed { .. }"),
        )
        .map(|data| {
            data.variants
                .iter()
                .filter_map(|v| EventVariant::from_ast(cx, v))
                .collect()
        })
        .unwrap_or_default();
        Self {
            ident: &input.ident,
            aggregate,
            variants,
        }
    }
}

impl<'a> EventVariant<'a> {
    fn from_ast(cx: &mut Ctxt, variant: &'a Variant) -> Option<Self> {
        let mut name = Slot::new(attr::KEY_NAME);
        let mut version = Slot::new(attr::KEY_VERSION);
        let mut apply = Slot::new(attr::KEY_APPLY);
        let mut upcasts = Vec::new();
        attr::for_each_meta(cx, &variant.attrs, attr::EVENT, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_VERSION.is(meta) {
                let n = attr::parse_int(meta, attr::KEY_VERSION)?;
                let v = to_u32(cx, n, attr::KEY_VERSION);
                version.set(cx, meta, (v, n.1));
            } else if attr::KEY_APPLY.is(meta) {
                let ident = attr::parse_ident(meta, attr::KEY_APPLY)?;
                apply.set(cx, meta, ident);
            } else if attr::KEY_UPCAST.is(meta) {
                if let Some(upcast) = Upcast::parse(cx, meta)? {
                    upcasts.push(upcast);
                }
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[event(...)]` on a variant",
                    &[
                        attr::KEY_NAME,
                        attr::KEY_VERSION,
                        attr::KEY_UPCAST,
                        attr::KEY_APPLY,
                    ],
                ));
            }
            Ok(())
        });
        let shape = shape(cx, variant, "event")?;
        let variant_name = variant.ident.unraw().to_string();
        let (name, explicit_name) = match name.get() {
            Some(lit) => (
                attr::Spanned {
                    value: lit.value.value(),
                    span: lit.value.span(),
                },
                true,
            ),
            None => (
                attr::Spanned {
                    value: variant_name.clone(),
                    span: variant.ident.span(),
                },
                false,
            ),
        };
        let version = version.get().map_or(
            attr::Spanned {
                value: 1,
                span: variant.ident.span(),
            },
            |s| attr::Spanned {
                value: s.value.0,
                span: s.value.1,
            },
        );
        let apply = match apply.get() {
            Some(s) => s.value,
            None => {
                let snake = heck::ToSnakeCase::to_snake_case(variant_name.as_str());
                method_ident(
                    cx,
                    &format!("apply_{snake}"),
                    variant.ident.span(),
                    attr::KEY_APPLY,
                )?
            }
        };
        Some(Self {
            ident: &variant.ident,
            attrs: &variant.attrs,
            name,
            explicit_name,
            version,
            upcasts,
            apply,
            shape,
        })
    }
}

impl Upcast {
    fn parse(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Option<Self>> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(meta.error("expected `upcast(from = <version>, with = <function>)`"));
        }
        let mut from = Slot::new(attr::KEY_FROM);
        let mut with = Slot::new(attr::KEY_WITH);
        meta.parse_nested_meta(|inner| {
            if attr::KEY_FROM.is(&inner) {
                let n = attr::parse_int(&inner, attr::KEY_FROM)?;
                let v = to_u32(cx, n, attr::KEY_FROM);
                from.set(cx, &inner, (v, n.1));
                Ok(())
            } else if attr::KEY_WITH.is(&inner) {
                let path = attr::parse_path(&inner, attr::KEY_WITH)?;
                with.set(cx, &inner, path);
                Ok(())
            } else {
                Err(attr::unknown_key(
                    &inner,
                    "`upcast(...)`",
                    &[attr::KEY_FROM, attr::KEY_WITH],
                ))
            }
        })?;
        let span = meta.path.span();
        match (from.get(), with.get()) {
            (Some(from), Some(with)) => Ok(Some(Self {
                from: attr::Spanned {
                    value: from.value.0,
                    span: from.value.1,
                },
                with: with.value,
                span,
            })),
            (None, _) => {
                cx.error_at(span, "`upcast` needs `from = <version>`: write upcast(from = 1, with = path::to::fn)");
                Ok(None)
            }
            (_, None) => {
                cx.error_at(span, "`upcast` needs `with = <function>`: write upcast(from = 1, with = path::to::fn)");
                Ok(None)
            }
        }
    }
}

/// `#[derive(Command)]` input.
pub(crate) struct CommandEnum<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) aggregate: Option<syn::Type>,
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
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
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
        Self {
            ident: &input.ident,
            aggregate,
            variants,
        }
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

/// `#[derive(Aggregate)]` input.
pub(crate) struct AggregateStruct<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: Option<attr::Spanned<String>>,
    pub(crate) command: Option<syn::Type>,
    pub(crate) event: Option<syn::Type>,
    pub(crate) error: Option<syn::Type>,
    pub(crate) snapshot: Option<Snapshot>,
}

/// `snapshot(every = N, version = V)`.
pub(crate) struct Snapshot {
    /// The `snapshot` key.
    pub(crate) span: Span,
    pub(crate) every: attr::Spanned<u64>,
    pub(crate) version: attr::Spanned<u32>,
}

impl<'a> AggregateStruct<'a> {
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        if !input.generics.params.is_empty() {
            cx.error_spanned_by(
                &input.generics,
                "derive(Aggregate) does not support generic parameters: use a concrete type",
            );
        }
        if let Data::Union(data) = &input.data {
            cx.error_spanned_by(
                data.union_token,
                "derive(Aggregate) works on a struct or an enum, not a union",
            );
        }
        let mut name = Slot::new(attr::KEY_NAME);
        let mut command = Slot::new(attr::KEY_COMMAND);
        let mut event = Slot::new(attr::KEY_EVENT);
        let mut error = Slot::new(attr::KEY_ERROR);
        let mut snapshot = Slot::new(attr::KEY_SNAPSHOT);
        let seen = input
            .attrs
            .iter()
            .any(|a| a.path().is_ident(attr::AGGREGATE));
        let written = attr::for_each_meta(cx, &input.attrs, attr::AGGREGATE, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_COMMAND.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_COMMAND)?;
                command.set(cx, meta, ty);
            } else if attr::KEY_EVENT.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_EVENT)?;
                event.set(cx, meta, ty);
            } else if attr::KEY_ERROR.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_ERROR)?;
                error.set(cx, meta, ty);
            } else if attr::KEY_SNAPSHOT.is(meta) {
                if let Some(s) = Snapshot::parse(cx, meta)? {
                    snapshot.set(cx, meta, s);
                }
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[aggregate(...)]`",
                    &[
                        attr::KEY_NAME,
                        attr::KEY_COMMAND,
                        attr::KEY_EVENT,
                        attr::KEY_ERROR,
                        attr::KEY_SNAPSHOT,
                    ],
                ));
            }
            Ok(())
        });
        let this = Self {
            ident: &input.ident,
            name: name.get().map(|s| attr::Spanned {
                value: s.value.value(),
                span: s.value.span(),
            }),
            command: command.get().map(|s| s.value),
            event: event.get().map(|s| s.value),
            error: error.get().map(|s| s.value),
            snapshot: snapshot.get().map(|s| s.value),
        };
        let ident = &input.ident;
        if !seen {
            cx.error_spanned_by(
                ident,
                format_args!(
                    "derive(Aggregate) needs `#[aggregate(name = \"...\", command = ..., event = ..., error = ...)]` on `{ident}`"
                ),
            );
        } else {
            let missing: Vec<&str> = [
                (attr::KEY_NAME, "name = \"...\""),
                (attr::KEY_COMMAND, "command = YourCommand"),
                (attr::KEY_EVENT, "event = YourEvent"),
                (attr::KEY_ERROR, "error = YourError"),
            ]
            .into_iter()
            .filter(|(key, _)| !written.has(*key))
            .map(|(_, example)| example)
            .collect();
            if !missing.is_empty() {
                cx.error_spanned_by(
                    ident,
                    format_args!(
                        "`#[aggregate(...)]` on `{ident}` is missing {}",
                        missing.join(", ")
                    ),
                );
            }
        }
        this
    }
}

impl Snapshot {
    fn parse(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Option<Self>> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(meta.error("expected `snapshot(every = <events>)`"));
        }
        let mut every = Slot::new(attr::KEY_EVERY);
        let mut version = Slot::new(attr::KEY_VERSION);
        meta.parse_nested_meta(|inner| {
            if attr::KEY_EVERY.is(&inner) {
                let n = attr::parse_int(&inner, attr::KEY_EVERY)?;
                every.set(cx, &inner, n);
                Ok(())
            } else if attr::KEY_VERSION.is(&inner) {
                let n = attr::parse_int(&inner, attr::KEY_VERSION)?;
                let v = to_u32(cx, n, attr::KEY_VERSION);
                version.set(cx, &inner, (v, n.1));
                Ok(())
            } else {
                Err(attr::unknown_key(
                    &inner,
                    "`snapshot(...)`",
                    &[attr::KEY_EVERY, attr::KEY_VERSION],
                ))
            }
        })?;
        let span = meta.path.span();
        let Some(every) = every.get() else {
            cx.error_at(
                span,
                "`snapshot` needs `every = <events>`: write snapshot(every = 100)",
            );
            return Ok(None);
        };
        Ok(Some(Self {
            span,
            every: attr::Spanned {
                value: every.value.0,
                span: every.value.1,
            },
            version: version
                .get()
                .map_or(attr::Spanned { value: 1, span }, |s| attr::Spanned {
                    value: s.value.0,
                    span: s.value.1,
                }),
        }))
    }
}

/// `#[derive(Projection)]` input.
pub(crate) struct ProjectionStruct<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: Option<attr::Spanned<String>>,
    /// The event enums, as written.
    pub(crate) events: Vec<syn::Path>,
    pub(crate) context: Option<syn::Type>,
}

impl<'a> ProjectionStruct<'a> {
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        if !input.generics.params.is_empty() {
            cx.error_spanned_by(
                &input.generics,
                "derive(Projection) does not support generic parameters: use a concrete type",
            );
        }
        if let Data::Union(data) = &input.data {
            cx.error_spanned_by(
                data.union_token,
                "derive(Projection) works on a struct or an enum, not a union",
            );
        }
        let mut name = Slot::new(attr::KEY_NAME);
        let mut events: Slot<Vec<syn::Path>> = Slot::new(attr::KEY_EVENTS);
        let mut context = Slot::new(attr::KEY_CONTEXT);
        let written = attr::for_each_meta(cx, &input.attrs, attr::PROJECTION, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_CONTEXT.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_CONTEXT)?;
                context.set(cx, meta, ty);
            } else if attr::KEY_EVENTS.is(meta) {
                if !meta.input.peek(syn::token::Paren) {
                    return Err(meta.error("expected `events(EventEnum, ...)`"));
                }
                let content;
                syn::parenthesized!(content in meta.input);
                let list: Vec<syn::Path> =
                    syn::punctuated::Punctuated::<syn::Path, syn::Token![,]>::parse_terminated(
                        &content,
                    )
                    .map_err(|e| {
                        syn::Error::new(
                            e.span(),
                            "expected the names of event enums: events(OrderEvent, PaymentEvent)",
                        )
                    })?
                    .into_iter()
                    .collect();
                if list.is_empty() {
                    cx.error_spanned_by(
                        &meta.path,
                        "`events()` is empty: list the event enums this projection handles, events(OrderEvent, ...)",
                    );
                }
                events.set(cx, meta, list);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[projection(...)]`",
                    &[attr::KEY_NAME, attr::KEY_EVENTS, attr::KEY_CONTEXT],
                ));
            }
            Ok(())
        });
        let ident = &input.ident;
        let name = name.get().map(|s| attr::Spanned {
            value: s.value.value(),
            span: s.value.span(),
        });
        let events = events.get().map(|s| s.value);
        if !input
            .attrs
            .iter()
            .any(|a| a.path().is_ident(attr::PROJECTION))
        {
            cx.error_spanned_by(
                ident,
                format_args!("derive(Projection) needs `#[projection(name = \"...\", events(...))]` on `{ident}`"),
            );
        } else {
            if name.is_none() && !written.has(attr::KEY_NAME) {
                cx.error_spanned_by(
                    ident,
                    format_args!("`#[projection(...)]` on `{ident}` is missing name = \"...\""),
                );
            }
            if events.is_none() && !written.has(attr::KEY_EVENTS) {
                cx.error_spanned_by(
                    ident,
                    format_args!(
                        "`#[projection(...)]` on `{ident}` is missing events(EventEnum, ...)"
                    ),
                );
            }
        }
        Self {
            ident,
            name,
            events: events.unwrap_or_default(),
            context: context.get().map(|s| s.value),
        }
    }
}

/// `#[derive(Saga)]` input: the enum of steps.
pub(crate) struct SagaEnum<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: Option<attr::Spanned<String>>,
    pub(crate) data: Option<syn::Type>,
    pub(crate) context: Option<syn::Type>,
    pub(crate) steps: Vec<SagaStep<'a>>,
}

/// A step's retry policy as written (milliseconds).
#[derive(Clone, Copy)]
pub(crate) struct Retry {
    pub(crate) attempts: (u64, Span),
    pub(crate) backoff_ms: (u64, Span),
    pub(crate) max_delay_ms: Option<(u64, Span)>,
}

/// One step (a unit variant).
pub(crate) struct SagaStep<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: attr::Spanned<String>,
    pub(crate) execute: Ident,
    pub(crate) compensate: Option<Ident>,
    pub(crate) retry: Option<Retry>,
    pub(crate) timeout_ms: Option<(u64, Span)>,
}

impl<'a> SagaEnum<'a> {
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        let mut name = Slot::new(attr::KEY_NAME);
        let mut data = Slot::new(attr::KEY_DATA);
        let mut context = Slot::new(attr::KEY_CONTEXT);
        attr::for_each_meta(cx, &input.attrs, attr::SAGA, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_DATA.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_DATA)?;
                data.set(cx, meta, ty);
            } else if attr::KEY_CONTEXT.is(meta) {
                let ty = attr::parse_type(cx, meta, attr::KEY_CONTEXT)?;
                context.set(cx, meta, ty);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[saga(...)]`",
                    &[attr::KEY_NAME, attr::KEY_DATA, attr::KEY_CONTEXT],
                ));
            }
            Ok(())
        });
        let ident = &input.ident;
        let name = name.get().map(|s| attr::Spanned {
            value: s.value.value(),
            span: s.value.span(),
        });
        let data = data.get().map(|s| s.value);
        let context = context.get().map(|s| s.value);
        let mut missing = Vec::new();
        if name.is_none() {
            missing.push("name = \"...\"");
        }
        if data.is_none() {
            missing.push("data = YourSagaData");
        }
        if context.is_none() {
            missing.push("context = YourServices");
        }
        if !missing.is_empty() && matches!(input.data, Data::Enum(_)) {
            cx.error_spanned_by(
                ident,
                format_args!(
                    "derive(Saga) needs {} in `#[saga(...)]` on `{ident}`",
                    missing.join(", ")
                ),
            );
        }
        if let Data::Struct(data) = &input.data {
            cx.error_spanned_by(
                data.struct_token,
                format_args!(
                    "derive(Saga) works on an enum of steps, not a struct: write `enum {ident} {{ Reserve, Pay, Ship }}` and put the saga's state in `data = ...`"
                ),
            );
        }
        let steps = (!matches!(input.data, Data::Struct(_)))
            .then(|| enum_data(cx, input, "Saga", ("Steps", "Reserve, Pay, Ship")))
            .flatten()
            .map(|data| {
                data.variants
                    .iter()
                    .filter_map(|v| SagaStep::from_ast(cx, v))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            ident,
            name,
            data,
            context,
            steps,
        }
    }
}

impl<'a> SagaStep<'a> {
    fn from_ast(cx: &mut Ctxt, variant: &'a Variant) -> Option<Self> {
        let mut name = Slot::new(attr::KEY_NAME);
        let mut execute = Slot::new(attr::KEY_EXECUTE);
        let mut compensate: Slot<Option<Ident>> = Slot::new(attr::KEY_COMPENSATE);
        let mut retry = Slot::new(attr::KEY_RETRY);
        let mut timeout = Slot::new(attr::KEY_TIMEOUT_MS);
        attr::for_each_meta(cx, &variant.attrs, attr::STEP, |cx, meta| {
            if attr::KEY_NAME.is(meta) {
                let lit = attr::parse_string(meta, attr::KEY_NAME)?;
                name.set(cx, meta, lit);
            } else if attr::KEY_EXECUTE.is(meta) {
                let ident = attr::parse_ident(meta, attr::KEY_EXECUTE)?;
                execute.set(cx, meta, ident);
            } else if attr::KEY_COMPENSATE.is(meta) {
                // `compensate` alone: the default method name; `compensate = method` names it.
                let method = if meta.input.peek(syn::Token![=]) {
                    Some(attr::parse_ident(meta, attr::KEY_COMPENSATE)?)
                } else {
                    attr::parse_flag(meta, attr::KEY_COMPENSATE)?;
                    None
                };
                compensate.set(cx, meta, method);
            } else if attr::KEY_TIMEOUT_MS.is(meta) {
                let value = attr::parse_int(meta, attr::KEY_TIMEOUT_MS)?;
                timeout.set(cx, meta, value);
            } else if attr::KEY_RETRY.is(meta) {
                let parsed = Retry::parse(cx, meta)?;
                retry.set(cx, meta, parsed);
            } else {
                return Err(attr::unknown_key(
                    meta,
                    "`#[step(...)]`",
                    &[
                        attr::KEY_EXECUTE,
                        attr::KEY_COMPENSATE,
                        attr::KEY_RETRY,
                        attr::KEY_TIMEOUT_MS,
                        attr::KEY_NAME,
                    ],
                ));
            }
            Ok(())
        });
        if !matches!(variant.fields, Fields::Unit) {
            let v = variant.ident.unraw();
            cx.error_spanned_by(
                &variant.fields,
                format_args!(
                    "a saga step is a unit variant (the saga's data is in `data = ...`): write `{v}`"
                ),
            );
            return None;
        }
        let snake = heck::ToSnakeCase::to_snake_case(variant.ident.unraw().to_string().as_str());
        let execute = match execute.get() {
            Some(s) => s.value,
            None => method_ident(cx, &snake, variant.ident.span(), attr::KEY_EXECUTE)?,
        };
        let compensate = match compensate.get() {
            None => None,
            Some(attr::Spanned {
                value: Some(method),
                ..
            }) => Some(method),
            Some(attr::Spanned { value: None, span }) => Some(method_ident(
                cx,
                &format!("compensate_{snake}"),
                span,
                attr::KEY_COMPENSATE,
            )?),
        };
        let name = name.get().map_or_else(
            || attr::Spanned {
                value: snake.clone(),
                span: variant.ident.span(),
            },
            |s| attr::Spanned {
                value: s.value.value(),
                span: s.value.span(),
            },
        );
        Some(Self {
            ident: &variant.ident,
            name,
            execute,
            compensate,
            retry: retry.get().map(|s| s.value),
            timeout_ms: timeout.get().map(|s| s.value),
        })
    }
}

impl Retry {
    /// `retry(attempts = 3, backoff_ms = 100, max_delay_ms = 2000)`.
    fn parse(cx: &mut Ctxt, meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Self> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(
                meta.error("expected `retry(attempts = 3, backoff_ms = 100, max_delay_ms = 2000)`")
            );
        }
        let mut attempts = Slot::new(attr::KEY_ATTEMPTS);
        let mut backoff = Slot::new(attr::KEY_BACKOFF_MS);
        let mut max_delay = Slot::new(attr::KEY_MAX_DELAY_MS);
        let span = meta.path.span();
        meta.parse_nested_meta(|inner| {
            if attr::KEY_ATTEMPTS.is(&inner) {
                let value = attr::parse_int(&inner, attr::KEY_ATTEMPTS)?;
                attempts.set(cx, &inner, value);
            } else if attr::KEY_BACKOFF_MS.is(&inner) {
                let value = attr::parse_int(&inner, attr::KEY_BACKOFF_MS)?;
                backoff.set(cx, &inner, value);
            } else if attr::KEY_MAX_DELAY_MS.is(&inner) {
                let value = attr::parse_int(&inner, attr::KEY_MAX_DELAY_MS)?;
                max_delay.set(cx, &inner, value);
            } else {
                // Reported here, so the keys after it are still read.
                cx.syn_error(attr::unknown_key(
                    &inner,
                    "`retry(...)`",
                    &[
                        attr::KEY_ATTEMPTS,
                        attr::KEY_BACKOFF_MS,
                        attr::KEY_MAX_DELAY_MS,
                    ],
                ));
                attr::skip_value(&inner);
            }
            Ok(())
        })?;
        let Some(attempts) = attempts.get() else {
            return Err(syn::Error::new(
                span,
                "`retry(...)` needs `attempts = N` (tries in all, at least 1)",
            ));
        };
        Ok(Self {
            attempts: attempts.value,
            backoff_ms: backoff.get().map_or((100, span), |s| s.value),
            max_delay_ms: max_delay.get().map(|s| s.value),
        })
    }
}
