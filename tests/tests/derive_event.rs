//! `#[derive(DomainEvent)]`: type names, versions, encoding, decoding, upcasting and its errors.

use evently_core::{DecodeError, DomainEvent, UpcastError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Address {
    street: String,
    city: String,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum CustomerEvent {
    Registered {
        name: String,
        #[serde(default)]
        vip: bool,
    },
    #[event(name = "customer.moved", version = 3, upcast(from = 2, with = moved_v2), upcast(from = 1, with = moved_v1))]
    Moved(Address),
    Deactivated,
    #[event(name = "Renamed")]
    r#Type {
        #[serde(rename = "newName")]
        r#type: String,
    },
}

/// v1 `{"address": "street, city"}` -> v2 `{"street": .., "town": ..}`.
fn moved_v1(payload: Value) -> Result<Value, UpcastError> {
    let address = payload["address"].as_str().ok_or("v1 needs `address`")?;
    let (street, city) = address
        .split_once(", ")
        .ok_or("v1 address without a comma")?;
    Ok(json!({ "street": street, "town": city }))
}

/// v2 `{"street", "town"}` -> v3 `{"street", "city"}`.
fn moved_v2(mut payload: Value) -> Result<Value, UpcastError> {
    let town = payload.get("town").cloned().ok_or("v2 needs `town`")?;
    payload["city"] = town;
    Ok(payload)
}

fn moved() -> CustomerEvent {
    CustomerEvent::Moved(Address {
        street: "Main St 1".into(),
        city: "Springfield".into(),
    })
}

#[test]
fn type_names_and_versions() {
    assert_eq!(
        CustomerEvent::EVENT_TYPES,
        ["Registered", "customer.moved", "Deactivated", "Renamed"]
    );
    assert_eq!(moved().event_type(), "customer.moved");
    assert_eq!(moved().schema_version(), 3);
    assert_eq!(CustomerEvent::Deactivated.event_type(), "Deactivated");
    assert_eq!(CustomerEvent::Deactivated.schema_version(), 1);
}

#[test]
fn every_shape_round_trips() {
    let events = [
        CustomerEvent::Registered {
            name: "Ada".into(),
            vip: true,
        },
        moved(),
        CustomerEvent::Deactivated,
        CustomerEvent::r#Type {
            r#type: "Grace".into(),
        },
    ];
    for event in events {
        let encoded = event.encode().unwrap();
        let decoded =
            CustomerEvent::decode(encoded.event_type, encoded.schema_version, &encoded.payload)
                .unwrap();
        assert_eq!(decoded, event, "payload {}", encoded.payload);
    }
}

#[test]
fn payload_is_the_variant_fields() {
    let registered = CustomerEvent::Registered {
        name: "Ada".into(),
        vip: false,
    };
    assert_eq!(
        registered.encode().unwrap().payload,
        json!({ "name": "Ada", "vip": false })
    );
    assert_eq!(
        moved().encode().unwrap().payload,
        json!({ "street": "Main St 1", "city": "Springfield" })
    );
    assert_eq!(
        CustomerEvent::Deactivated.encode().unwrap().payload,
        json!({})
    );
    let renamed = CustomerEvent::r#Type {
        r#type: "Grace".into(),
    };
    assert_eq!(
        renamed.encode().unwrap().payload,
        json!({ "newName": "Grace" }),
        "serde attributes are honoured"
    );
}

#[test]
fn serde_default_fills_a_field_added_later() {
    let decoded = CustomerEvent::decode("Registered", 1, &json!({ "name": "Ada" })).unwrap();
    assert_eq!(
        decoded,
        CustomerEvent::Registered {
            name: "Ada".into(),
            vip: false
        }
    );
}

#[test]
fn unit_variants_accept_null_and_objects() {
    for payload in [json!(null), json!({}), json!({ "ignored": 1 })] {
        assert_eq!(
            CustomerEvent::decode("Deactivated", 1, &payload).unwrap(),
            CustomerEvent::Deactivated
        );
    }
}

#[test]
fn upcasters_chain_from_every_older_version() {
    let v1 = json!({ "address": "Main St 1, Springfield" });
    let v2 = json!({ "street": "Main St 1", "town": "Springfield" });
    assert_eq!(
        CustomerEvent::decode("customer.moved", 1, &v1).unwrap(),
        moved()
    );
    assert_eq!(
        CustomerEvent::decode("customer.moved", 2, &v2).unwrap(),
        moved()
    );
}

#[test]
fn unknown_type_is_a_typed_error() {
    let error = CustomerEvent::decode("Exploded", 1, &json!({})).unwrap_err();
    assert_eq!(
        error,
        DecodeError::UnknownType {
            event_type: "Exploded".into(),
            known: CustomerEvent::EVENT_TYPES,
        }
    );
    assert!(
        error.to_string().contains("unknown event type `Exploded`"),
        "{error}"
    );
}

#[test]
fn payload_that_does_not_fit_is_a_typed_error() {
    let error = CustomerEvent::decode("Registered", 1, &json!({ "name": 42 })).unwrap_err();
    match &error {
        DecodeError::Payload {
            event_type,
            schema_version,
            message,
        } => {
            assert_eq!(*event_type, "Registered");
            assert_eq!(*schema_version, 1);
            assert!(message.contains("invalid type"), "{message}");
        }
        other => panic!("expected a payload error, got {other:?}"),
    }
    assert!(matches!(
        CustomerEvent::decode("customer.moved", 3, &json!("not an object")),
        Err(DecodeError::Payload { .. })
    ));
}

#[test]
fn versions_outside_the_known_range_are_typed_errors() {
    for version in [0, 4, u32::MAX] {
        let error = CustomerEvent::decode("customer.moved", version, &json!({})).unwrap_err();
        assert_eq!(
            error,
            DecodeError::UnsupportedVersion {
                event_type: "customer.moved",
                found: version,
                oldest: 1,
                current: 3,
            }
        );
    }
    assert!(matches!(
        CustomerEvent::decode("Registered", 2, &json!({ "name": "Ada" })),
        Err(DecodeError::UnsupportedVersion {
            oldest: 1,
            current: 1,
            ..
        })
    ));
}

#[test]
fn a_failing_upcaster_is_a_typed_error() {
    let error =
        CustomerEvent::decode("customer.moved", 1, &json!({ "address": "no comma" })).unwrap_err();
    assert_eq!(
        error,
        DecodeError::Upcast {
            event_type: "customer.moved",
            from: 1,
            message: "v1 address without a comma".into(),
        }
    );
}

#[test]
fn arbitrary_payloads_never_panic() {
    let payloads = [
        json!(null),
        json!(1),
        json!("s"),
        json!([1, 2]),
        json!({ "name": null }),
        json!({ "address": 5 }),
        json!({ "street": [] }),
    ];
    for name in CustomerEvent::EVENT_TYPES.iter().chain(&["", "x"]) {
        for version in 0..5 {
            for payload in &payloads {
                let _ = CustomerEvent::decode(name, version, payload);
            }
        }
    }
}
