//! Branch conditions, evaluated on a contact's state when the step runs:
//! its tags, its attributes, and the segments it is a member of.
//!
//! Attribute comparisons follow contacts' segment rules: EQ, NE (the
//! attribute exists and differs), LT / LE / GT / GE (numbers, timestamps,
//! strings by code point), IN (equal to one of the values), CONTAINS (a
//! string attribute contains the value) and EXISTS. Values of different
//! types never compare: the condition does not hold.

use std::cmp::Ordering;
use std::collections::HashSet;

use hibiki_proto::common::v1::{Value, value::Kind};
use hibiki_proto::contacts::v1::{AttributeCondition, Comparison, Contact};
use hibiki_proto::scenario::v1::{Condition, condition};

/// Whether `c` holds for `contact`, member of `segments`.
pub fn holds(c: &Condition, contact: &Contact, segments: &HashSet<String>) -> bool {
    match &c.node {
        None => false,
        Some(condition::Node::HasTag(t)) => contact.tags.iter().any(|x| x == t),
        Some(condition::Node::InSegment(s)) => segments.contains(s),
        Some(condition::Node::All(l)) => l.conditions.iter().all(|c| holds(c, contact, segments)),
        Some(condition::Node::Any(l)) => l.conditions.iter().any(|c| holds(c, contact, segments)),
        Some(condition::Node::Not(inner)) => !holds(inner, contact, segments),
        Some(condition::Node::Attribute(a)) => attribute_holds(a, contact),
    }
}

/// The order of two values of one type; `None` across types.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a.kind.as_ref()?, b.kind.as_ref()?) {
        (Kind::StringValue(x), Kind::StringValue(y)) => Some(x.cmp(y)),
        (Kind::NumberValue(x), Kind::NumberValue(y)) => x.partial_cmp(y),
        (Kind::BoolValue(x), Kind::BoolValue(y)) => Some(x.cmp(y)),
        (Kind::TimestampValue(x), Kind::TimestampValue(y)) => {
            Some((x.seconds, x.nanos).cmp(&(y.seconds, y.nanos)))
        }
        _ => None,
    }
}

fn attribute_holds(a: &AttributeCondition, contact: &Contact) -> bool {
    let Some(actual) = contact.attributes.get(&a.key) else {
        return false;
    };
    let against = |want: Option<&Value>| want.and_then(|w| compare(actual, w));
    match a.op() {
        Comparison::Unspecified => false,
        Comparison::Exists => actual.kind.is_some(),
        Comparison::Eq => against(a.value.as_ref()) == Some(Ordering::Equal),
        Comparison::Ne => matches!(
            against(a.value.as_ref()),
            Some(Ordering::Less | Ordering::Greater)
        ),
        Comparison::Lt => against(a.value.as_ref()) == Some(Ordering::Less),
        Comparison::Le => matches!(
            against(a.value.as_ref()),
            Some(Ordering::Less | Ordering::Equal)
        ),
        Comparison::Gt => against(a.value.as_ref()) == Some(Ordering::Greater),
        Comparison::Ge => matches!(
            against(a.value.as_ref()),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        Comparison::In => a
            .values
            .iter()
            .any(|v| compare(actual, v) == Some(Ordering::Equal)),
        Comparison::Contains => {
            match (&actual.kind, a.value.as_ref().and_then(|v| v.kind.as_ref())) {
                (Some(Kind::StringValue(s)), Some(Kind::StringValue(part))) => {
                    s.contains(part.as_str())
                }
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::from_yaml;

    fn condition(yaml: &str) -> Condition {
        let text = format!(
            "name: t\ntrigger: {{ follow: {{}} }}\nsteps:\n  - id: b\n    branch:\n      if: {yaml}\n"
        );
        let d = from_yaml(&text).unwrap();
        let Some(hibiki_proto::scenario::v1::step::Action::Branch(b)) = &d.steps[0].action else {
            panic!("a branch")
        };
        b.condition.clone().unwrap()
    }

    fn value(kind: Kind) -> Value {
        Value { kind: Some(kind) }
    }

    fn contact() -> Contact {
        Contact {
            tags: vec!["campaign:spring".into(), "vip".into()],
            attributes: [
                ("age".to_owned(), value(Kind::NumberValue(31.0))),
                ("city".to_owned(), value(Kind::StringValue("Osaka".into()))),
                ("member".to_owned(), value(Kind::BoolValue(true))),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn tags_segments_and_their_combinations() {
        let (c, segments) = (contact(), HashSet::from(["seg-1".to_owned()]));
        let cases = [
            ("{ has_tag: vip }", true),
            ("{ has_tag: gold }", false),
            ("{ in_segment: seg-1 }", true),
            ("{ in_segment: seg-2 }", false),
            ("{ all: [{ has_tag: vip }, { in_segment: seg-1 }] }", true),
            ("{ all: [{ has_tag: vip }, { has_tag: gold }] }", false),
            ("{ any: [{ has_tag: gold }, { in_segment: seg-1 }] }", true),
            ("{ not: { has_tag: 'campaign:spring' } }", false),
        ];
        for (yaml, want) in cases {
            assert_eq!(holds(&condition(yaml), &c, &segments), want, "{yaml}");
        }
    }

    #[test]
    fn attributes_compare_as_segment_rules_do() {
        let (c, none) = (contact(), HashSet::new());
        let cases = [
            ("{ attribute: { key: age, op: ge, value: 30 } }", true),
            ("{ attribute: { key: age, op: lt, value: 30 } }", false),
            ("{ attribute: { key: age, op: eq, value: 31 } }", true),
            ("{ attribute: { key: age, op: ne, value: 31 } }", false),
            (
                "{ attribute: { key: age, op: in, values: [20, 31] } }",
                true,
            ),
            // Different types never compare.
            ("{ attribute: { key: age, op: eq, value: '31' } }", false),
            ("{ attribute: { key: age, op: ne, value: '31' } }", false),
            (
                "{ attribute: { key: city, op: contains, value: Osa } }",
                true,
            ),
            ("{ attribute: { key: city, op: lt, value: Tokyo } }", true),
            ("{ attribute: { key: member, op: eq, value: true } }", true),
            ("{ attribute: { key: member, op: exists } }", true),
            // A missing attribute holds nothing, NE included.
            ("{ attribute: { key: plan, op: exists } }", false),
            ("{ attribute: { key: plan, op: ne, value: gold } }", false),
        ];
        for (yaml, want) in cases {
            assert_eq!(holds(&condition(yaml), &c, &none), want, "{yaml}");
        }
    }
}
