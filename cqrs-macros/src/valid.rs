//! Checks across attributes and variants, one function per rule.

use std::collections::BTreeMap;

use crate::ast::{
    AggregateStruct, CommandEnum, CommandVariant, EventEnum, ProjectionStruct, SagaEnum, Shape,
};
use crate::attr::Spanned;
use crate::ctxt::Ctxt;

/// Serde field attributes that cannot work on an event's struct variant: the generated serializer
/// holds the fields by reference, so these functions would receive `&&T`.
const UNSUPPORTED_SERDE: &[&str] = &["skip_serializing_if", "serialize_with", "with"];

pub(crate) fn event_enum(cx: &mut Ctxt, input: &EventEnum<'_>) {
    event_names_are_stored_names(cx, input);
    event_names_are_unique(cx, input);
    event_versions_start_at_one(cx, input);
    upcasts_form_a_chain(cx, input);
    event_fields_serialize_by_reference(cx, input);
    event_variants_have_no_serde_attributes(cx, input);
}

/// A type name is stored with every event and read back by name: it must be non-empty text without
/// surrounding or control whitespace, or a stored event could never be matched to its variant.
fn event_names_are_stored_names(cx: &mut Ctxt, input: &EventEnum<'_>) {
    for v in &input.variants {
        let name = &v.name.value;
        if name.is_empty() {
            cx.error_at(
                v.name.span,
                "event name is empty: write name = \"OrderCreated\"",
            );
        } else if name.trim() != name || name.chars().any(char::is_control) {
            cx.error_at(
                v.name.span,
                format_args!(
                    "event name `{}` has leading, trailing or control whitespace: write it without",
                    name.escape_debug()
                ),
            );
        }
    }
}

/// Two variants with one stored name would make decoding ambiguous; the error points at the second
/// one and notes the first.
fn event_names_are_unique(cx: &mut Ctxt, input: &EventEnum<'_>) {
    let mut seen: BTreeMap<&str, &crate::ast::EventVariant<'_>> = BTreeMap::new();
    for v in &input.variants {
        if let Some(first) = seen.get(v.name.value.as_str()) {
            let fix = if v.explicit_name {
                "give one of them another `name`"
            } else {
                "give one of them another name with #[event(name = \"...\")]"
            };
            cx.error_at(
                v.name.span,
                format_args!(
                    "duplicate event name `{}`: variant `{}` uses it too; {fix}",
                    v.name.value, first.ident
                ),
            );
            cx.error_at(
                first.name.span,
                format_args!("event name `{}` first used here", v.name.value),
            );
        } else {
            seen.insert(&v.name.value, v);
        }
    }
}

/// Schema versions count from 1; 0 would be read as "no version".
fn event_versions_start_at_one(cx: &mut Ctxt, input: &EventEnum<'_>) {
    for v in &input.variants {
        if v.version.value == 0 {
            cx.error_at(
                v.version.span,
                "schema versions start at 1: write version = 1 or higher",
            );
        }
    }
}

/// Upcasters turn a payload of version `from` into version `from + 1`; together they must lead from
/// the oldest declared version to the current one without a hole, each version once.
fn upcasts_form_a_chain(cx: &mut Ctxt, input: &EventEnum<'_>) {
    for v in &input.variants {
        let current = v.version.value;
        let mut froms = BTreeMap::new();
        for u in &v.upcasts {
            let from = u.from.value;
            if from == 0 {
                cx.error_at(
                    u.from.span,
                    "schema versions start at 1: upcast from 1 or higher",
                );
            } else if from >= current {
                cx.error_at(
                    u.from.span,
                    format_args!(
                        "upcast from version {from} must be below the event's version {current}: raise `version` or lower `from`"
                    ),
                );
            } else if froms.insert(from, u).is_some() {
                cx.error_at(
                    u.from.span,
                    format_args!("duplicate upcast from version {from}"),
                );
            }
        }
        if let Some((&oldest, first)) = froms.iter().next() {
            for missing in (oldest..current).filter(|n| !froms.contains_key(n)) {
                cx.error_at(
                    first.span,
                    format_args!(
                        "upcasters must lead from version {oldest} to {current}: add upcast(from = {missing}, with = ...)"
                    ),
                );
            }
        }
    }
}

/// The derive encodes each variant itself, under its type name: serde's variant attributes
/// (from a `Serialize` derive beside it) would be silently ignored, and a `rename` would look
/// as if it named the stored type.
fn event_variants_have_no_serde_attributes(cx: &mut Ctxt, input: &EventEnum<'_>) {
    for v in &input.variants {
        for attr in v.attrs.iter().filter(|a| a.path().is_ident("serde")) {
            let _ = attr.parse_nested_meta(|meta| {
                let key = meta
                    .path
                    .get_ident()
                    .map_or_else(|| "...".to_owned(), ToString::to_string);
                if key == "rename" || key == "alias" {
                    cx.error_spanned_by(
                        &meta.path,
                        format_args!(
                            "#[serde({key})] does not change the stored type name of an event: write #[event(name = \"...\")] on the variant `{}`",
                            v.ident
                        ),
                    );
                } else {
                    cx.error_spanned_by(
                        &meta.path,
                        format_args!(
                            "#[serde({key})] on an event variant is ignored: DomainEvent encodes each variant's fields itself (name it with #[event(name = \"...\")], shape its payload with a newtype variant `{}(YourStruct)`)",
                            v.ident
                        ),
                    );
                }
                skip_value(&meta)
            });
        }
    }
}

/// Skips a nested meta's value (`= expr` or `(...)`): the serde checks only look at keys.
fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        meta.value()?.parse::<syn::Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<proc_macro2::TokenStream>()?;
    }
    Ok(())
}

/// See [`UNSUPPORTED_SERDE`].
fn event_fields_serialize_by_reference(cx: &mut Ctxt, input: &EventEnum<'_>) {
    for v in &input.variants {
        let Shape::Struct(fields) = &v.shape else {
            continue;
        };
        for attr in fields
            .iter()
            .flat_map(|f| &f.attrs)
            .filter(|a| a.path().is_ident("serde"))
        {
            let _ = attr.parse_nested_meta(|meta| {
                if let Some(key) = UNSUPPORTED_SERDE.iter().find(|k| meta.path.is_ident(k)) {
                    cx.error_spanned_by(
                        &meta.path,
                        format_args!(
                            "#[serde({key})] is not supported on the fields of an event variant: move the fields into a struct with its own serde derive and use a newtype variant `{}(YourStruct)`",
                            v.ident
                        ),
                    );
                }
                skip_value(&meta)
            });
        }
    }
}

pub(crate) fn projection(cx: &mut Ctxt, input: &ProjectionStruct<'_>) {
    projection_name_is_a_key(cx, input);
    projection_events_are_distinct(cx, input);
    projection_version_in_range(cx, input);
    projection_tables_are_names(cx, input);
}

/// Versions count from 1; the name of version N carries it (`name@vN`).
fn projection_version_in_range(cx: &mut Ctxt, input: &ProjectionStruct<'_>) {
    if let Some(version) = &input.version
        && (version.value == 0 || version.value > 9_999)
    {
        cx.error_at(
            version.span,
            format_args!(
                "projection version {} is out of range: versions count from 1 to 9999; write version = 2 for the version after the first",
                version.value
            ),
        );
    }
}

/// A table is a view's name readers use, and `<name>_vN` is each version's table: an SQL
/// identifier, with a schema before a dot if it is not in the store's.
fn projection_tables_are_names(cx: &mut Ctxt, input: &ProjectionStruct<'_>) {
    let identifier = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && part.len() <= 50
    };
    let mut seen = Vec::new();
    for table in &input.tables {
        let name = table.value();
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| identifier(p)) {
            cx.error_spanned_by(
                table,
                format_args!(
                    "table `{}` is not a table name: write lowercase letters, digits and `_` (up to 50), with a schema before a dot if needed, e.g. tables(\"balances\") or tables(\"read_models.balances\")",
                    name.escape_debug()
                ),
            );
        } else if seen.contains(&name) {
            cx.error_spanned_by(
                table,
                format_args!("table `{name}` is listed twice in tables(...)"),
            );
        } else {
            seen.push(name);
        }
    }
}

/// The projection name keys its checkpoint and dead letters.
fn projection_name_is_a_key(cx: &mut Ctxt, input: &ProjectionStruct<'_>) {
    name_is_a_key(cx, &input.name, "projection", "order_summary");
}

/// A name stored as a key (of checkpoints, dead letters, saga instances): ASCII letters, digits,
/// `_`, `-` and `.`, 1 to 200 of them.
fn name_is_a_key(cx: &mut Ctxt, name: &Spanned<String>, what: &str, example: &str) {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.value.is_empty() || !name.value.chars().all(valid) || name.value.len() > 200 {
        cx.error_at(
            name.span,
            format_args!(
                "{what} name `{}` must be 1 to 200 ASCII letters, digits, `_`, `-` or `.`: write for example name = \"{example}\"",
                name.value.escape_debug()
            ),
        );
    }
}

/// An enum listed twice would have two routes for one event.
fn projection_events_are_distinct(cx: &mut Ctxt, input: &ProjectionStruct<'_>) {
    let mut seen = Vec::new();
    for path in &input.events {
        let text = quote::quote!(#path).to_string();
        if seen.contains(&text) {
            cx.error_spanned_by(
                path,
                format_args!("`{}` is listed twice in events(...)", text.replace(' ', "")),
            );
        } else {
            seen.push(text);
        }
    }
}

pub(crate) fn saga(cx: &mut Ctxt, input: &SagaEnum<'_>) {
    saga_name_is_a_key(cx, input);
    saga_step_names_are_unique(cx, input);
    saga_retry_values_make_sense(cx, input);
}

/// The saga name is stored with every instance.
fn saga_name_is_a_key(cx: &mut Ctxt, input: &SagaEnum<'_>) {
    name_is_a_key(cx, &input.name, "saga", "order_fulfillment");
}

/// Step names are stored with each outcome: two steps with one name could not be told apart.
fn saga_step_names_are_unique(cx: &mut Ctxt, input: &SagaEnum<'_>) {
    for (i, step) in input.steps.iter().enumerate() {
        if let Some(first) = input.steps[..i]
            .iter()
            .find(|s| s.name.value == step.name.value)
        {
            cx.error_at(
                step.name.span,
                format_args!(
                    "step name `{}` is used by `{}` already: give this step another with #[step(name = \"...\")]",
                    step.name.value, first.ident
                ),
            );
        }
    }
}

/// At least one try, a delay cap not below the first delay, a timeout above zero.
fn saga_retry_values_make_sense(cx: &mut Ctxt, input: &SagaEnum<'_>) {
    for step in &input.steps {
        if let Some(retry) = step.retry {
            let (attempts, span) = retry.attempts;
            if !(1..=1_000).contains(&attempts) {
                cx.error_at(
                    span,
                    "attempts counts every try, the first included: write a number from 1 to 1000",
                );
            }
            if let Some((max, span)) = retry.max_delay_ms
                && max < retry.backoff_ms.0
            {
                cx.error_at(
                    span,
                    format_args!(
                        "max_delay_ms ({max}) is below backoff_ms ({}): the cap must be at least the first delay",
                        retry.backoff_ms.0
                    ),
                );
            }
        }
        if let Some((0, span)) = step.timeout_ms {
            cx.error_at(
                span,
                "a timeout of 0 ms fails every try: give the step time (timeout_ms = 5000) or leave the key out",
            );
        }
    }
}

pub(crate) fn aggregate(cx: &mut Ctxt, input: &AggregateStruct<'_>) {
    aggregate_name_is_a_stream_prefix(cx, input);
    snapshot_values_are_positive(cx, input);
}

/// The aggregate name starts every stream id and names Kafka topics: ASCII letters, digits, `_`, `-`
/// and `.`, as Kafka topic names allow, and not empty.
fn aggregate_name_is_a_stream_prefix(cx: &mut Ctxt, input: &AggregateStruct<'_>) {
    let name = &input.name;
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.value.is_empty() {
        cx.error_at(name.span, "aggregate name is empty: write name = \"order\"");
    } else if !name.value.chars().all(valid) || name.value.len() > 200 {
        cx.error_at(
            name.span,
            format_args!(
                "aggregate name `{}` may hold only ASCII letters, digits, `_`, `-` and `.` (at most 200): write for example name = \"{}\"",
                name.value.escape_debug(),
                name.value.chars().filter(|&c| valid(c)).collect::<String>().to_lowercase()
            ),
        );
    }
}

/// A snapshot every 0 events, or a snapshot schema version 0, means nothing.
fn snapshot_values_are_positive(cx: &mut Ctxt, input: &AggregateStruct<'_>) {
    let Some(snapshot) = &input.snapshot else {
        return;
    };
    if snapshot.every.value == 0 {
        cx.error_at(
            snapshot.every.span,
            "snapshot every 0 events: write every = 1 or more, or remove `snapshot`",
        );
    }
    if snapshot.version.value == 0 {
        cx.error_at(
            snapshot.version.span,
            "snapshot schema versions start at 1: write version = 1 or higher",
        );
    }
}

pub(crate) fn command(cx: &mut Ctxt, input: &CommandEnum<'_>) {
    shared_handlers_take_the_same_fields(cx, input);
}

/// Two variants may dispatch to one handler method only with the same fields (names and types,
/// in order): the handler takes the fields as its arguments, so any other pair cannot compile, and
/// rustc would report it on generated code.
fn shared_handlers_take_the_same_fields(cx: &mut Ctxt, input: &CommandEnum<'_>) {
    let mut first: BTreeMap<String, &CommandVariant<'_>> = BTreeMap::new();
    for variant in &input.variants {
        let handler = variant.handler.to_string();
        let Some(earlier) = first.get(&handler) else {
            first.insert(handler, variant);
            continue;
        };
        if fields_of(&earlier.shape) != fields_of(&variant.shape) {
            cx.error_spanned_by(
                &variant.handler,
                format_args!(
                    "`{}` and `{}` both dispatch to handler `{handler}` but carry different fields: a handler takes one set of fields as its arguments; give `{}` its own handler with #[command(handler = ...)]",
                    earlier.ident, variant.ident, variant.ident
                ),
            );
        }
    }
}

/// A variant's fields as the handler receives them: names (none for a newtype) and types, in order.
fn fields_of(shape: &Shape<'_>) -> Vec<(Option<String>, String)> {
    let ty = |ty: &syn::Type| quote::ToTokens::to_token_stream(ty).to_string();
    match shape {
        Shape::Unit => Vec::new(),
        Shape::Newtype(t) => vec![(None, ty(t))],
        Shape::Struct(fields) => fields
            .iter()
            .map(|f| (f.ident.as_ref().map(ToString::to_string), ty(&f.ty)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use syn::{DeriveInput, parse_quote};

    use crate::ast::{AggregateStruct, EventEnum};
    use crate::ctxt::Ctxt;

    fn event_errors(input: &DeriveInput) -> Vec<String> {
        let mut cx = Ctxt::default();
        let model = EventEnum::from_ast(&mut cx, input);
        super::event_enum(&mut cx, &model);
        cx.check()
            .err()
            .map_or_else(Vec::new, |e| e.into_iter().map(|e| e.to_string()).collect())
    }

    fn aggregate_errors(input: &DeriveInput) -> Vec<String> {
        let mut cx = Ctxt::default();
        if let crate::ast::Parsed::Complete(model) = AggregateStruct::from_ast(&mut cx, input) {
            super::aggregate(&mut cx, &model);
        }
        cx.check()
            .err()
            .map_or_else(Vec::new, |e| e.into_iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn a_valid_event_enum_has_no_errors() {
        let input: DeriveInput = parse_quote! {
            #[event(aggregate = Order)]
            enum OrderEvent {
                Created { id: String },
                #[event(name = "order.shipped", version = 3, upcast(from = 1, with = a), upcast(from = 2, with = b))]
                Shipped(Shipment),
                Closed,
            }
        };
        assert_eq!(event_errors(&input), Vec::<String>::new());
    }

    #[test]
    fn every_bad_attribute_is_reported_at_once() {
        let input: DeriveInput = parse_quote! {
            enum OrderEvent {
                #[event(version = 0, bogus = 1)]
                Created { id: String },
                #[event(name = "Created")]
                Other,
                #[event(version = 4, upcast(from = 1, with = f), upcast(from = 1, with = g))]
                Third,
            }
        };
        let errors = event_errors(&input);
        let expected = [
            "unknown key `bogus`",
            "schema versions start at 1",
            "duplicate event name `Created`",
            "event name `Created` first used here",
            "duplicate upcast from version 1",
            "add upcast(from = 2, with = ...)",
            "add upcast(from = 3, with = ...)",
        ];
        for needle in expected {
            assert!(
                errors.iter().any(|e| e.contains(needle)),
                "no error containing {needle:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn names_with_whitespace_are_rejected() {
        let input: DeriveInput = parse_quote! {
            enum E {
                #[event(name = " Padded")]
                A,
            }
        };
        assert!(event_errors(&input)[0].contains("leading, trailing or control whitespace"));
    }

    #[test]
    fn aggregate_names_must_be_stream_prefixes() {
        for (name, ok) in [
            ("order", true),
            ("order-v2.eu_1", true),
            ("", false),
            ("my order", false),
            ("ördér", false),
        ] {
            let input: DeriveInput = parse_quote! {
                #[aggregate(name = #name, command = C, event = E, error = Er)]
                struct A;
            };
            assert_eq!(
                aggregate_errors(&input).is_empty(),
                ok,
                "{name:?}: {:?}",
                aggregate_errors(&input)
            );
        }
    }

    #[test]
    fn missing_aggregate_keys_are_listed_together() {
        let input: DeriveInput = parse_quote! {
            #[aggregate(event = E)]
            struct A;
        };
        assert_eq!(
            aggregate_errors(&input),
            [
                "`#[aggregate(...)]` on `A` is missing name = \"...\", command = YourCommand, error = YourError"
            ]
        );
    }
}
