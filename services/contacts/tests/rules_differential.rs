//! The SQL evaluator and the Rust evaluator of segment rules agree: random
//! contacts are stored in the real `contacts` table, random rules are
//! evaluated both ways, and the member sets must be equal. Seeds are fixed
//! so a failure reproduces; the failing seed and rule are printed.

mod common;

use std::collections::BTreeSet;

use hibiki_contacts::attrs::{self, AttrValue, Attributes};
use hibiki_contacts::rules::{ContactState, Rule, SqlParams};
use hibiki_proto::common::v1::{Value, value::Kind};
use hibiki_proto::contacts::v1::{
    AttributeCondition, Comparison, HasTag, RuleList, SegmentRule, segment_rule::Node,
};
use hibiki_testkit::TestDatabase;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Row;

const TAGS: [&str; 4] = ["a", "b", "c", "campaign:spring"];
const KEYS: [&str; 5] = ["age", "city", "vip", "signup", "mixed"];
const CITIES: [&str; 6] = ["tokyo", "Tokyo", "osaka", "", "kyo", "東京"];

fn random_value(rng: &mut StdRng, key: &str) -> AttrValue {
    let kind = match key {
        "age" => 0,
        "city" => 1,
        "vip" => 2,
        "signup" => 3,
        _ => rng.random_range(0..4),
    };
    match kind {
        0 => {
            let choices = [-2.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.1 + 0.2, 1e300, -1e-300];
            AttrValue::Num(choices[rng.random_range(0..choices.len())])
        }
        1 => AttrValue::Str(CITIES[rng.random_range(0..CITIES.len())].to_owned()),
        2 => AttrValue::Bool(rng.random_bool(0.5)),
        _ => AttrValue::Ts(1_700_000_000_000_000 + rng.random_range(-3..3i64) * 1_000_000),
    }
}

fn random_contact(rng: &mut StdRng) -> ContactState {
    let tags = TAGS
        .iter()
        .filter(|_| rng.random_bool(0.4))
        .map(|t| (*t).to_owned())
        .collect();
    let mut attributes = Attributes::new();
    for key in KEYS {
        if rng.random_bool(0.7) {
            let value = random_value(rng, key);
            attributes.insert(key.to_owned(), value);
        }
    }
    ContactState {
        follow_state: rng.random_range(0..3),
        tags,
        attributes,
    }
}

fn proto_value(v: &AttrValue) -> Value {
    v.to_proto()
}

fn random_rule(rng: &mut StdRng, depth: u32) -> SegmentRule {
    let leaf = depth >= 3 || rng.random_bool(0.5);
    let node = if leaf {
        match rng.random_range(0..3) {
            0 => {
                let t = if rng.random_bool(0.9) {
                    TAGS[rng.random_range(0..TAGS.len())]
                } else {
                    "absent"
                };
                Node::HasTag(HasTag { tag: t.into() })
            }
            1 => Node::FollowState(rng.random_range(0..3)),
            _ => {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                let ops = [
                    Comparison::Eq,
                    Comparison::Ne,
                    Comparison::Lt,
                    Comparison::Le,
                    Comparison::Gt,
                    Comparison::Ge,
                    Comparison::In,
                    Comparison::Contains,
                    Comparison::Exists,
                ];
                let op = ops[rng.random_range(0..ops.len())];
                // Mostly the key's own type, sometimes another.
                let typed_key = if rng.random_bool(0.8) { key } else { "mixed" };
                let (value, values) = match op {
                    Comparison::Exists => (None, vec![]),
                    Comparison::In => {
                        let first = random_value(rng, typed_key);
                        let mut values = vec![proto_value(&first)];
                        for _ in 0..rng.random_range(0..3) {
                            let v = random_value(rng, typed_key);
                            if v.kind() == first.kind() {
                                values.push(proto_value(&v));
                            }
                        }
                        (None, values)
                    }
                    Comparison::Contains => {
                        let needles = ["", "kyo", "to", "Tok", "京"];
                        (
                            Some(Value {
                                kind: Some(Kind::StringValue(
                                    needles[rng.random_range(0..needles.len())].into(),
                                )),
                            }),
                            vec![],
                        )
                    }
                    _ => (Some(proto_value(&random_value(rng, typed_key))), vec![]),
                };
                Node::Attribute(AttributeCondition {
                    key: key.into(),
                    op: op as i32,
                    value,
                    values,
                })
            }
        }
    } else {
        match rng.random_range(0..3) {
            0 => Node::All(RuleList {
                rules: (0..rng.random_range(1..4))
                    .map(|_| random_rule(rng, depth + 1))
                    .collect(),
            }),
            1 => Node::Any(RuleList {
                rules: (0..rng.random_range(1..4))
                    .map(|_| random_rule(rng, depth + 1))
                    .collect(),
            }),
            _ => Node::Not(Box::new(random_rule(rng, depth + 1))),
        }
    };
    SegmentRule { node: Some(node) }
}

#[tokio::test]
async fn the_sql_and_rust_evaluators_agree_on_random_rules_and_contacts() {
    let database = TestDatabase::create().await;
    let pool = common::migrated_pool(&database).await;

    let mut compared = 0;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let tenant = format!("seed{seed}");
        let contacts: Vec<(String, ContactState)> = (0..150)
            .map(|i| (format!("U{i:032x}"), random_contact(&mut rng)))
            .collect();
        for (id, c) in &contacts {
            sqlx::query(
                "INSERT INTO contacts (tenant_id, line_user_id, follow_state, tags, attributes) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&tenant)
            .bind(id)
            .bind(c.follow_state as i16)
            .bind(c.tags.iter().cloned().collect::<Vec<_>>())
            .bind(attrs::attributes_to_json(&c.attributes))
            .execute(&pool)
            .await
            .unwrap();
        }

        let mut rules_tried = 0;
        while rules_tried < 150 {
            let proto = random_rule(&mut rng, 0);
            let Ok(rule) = Rule::parse(Some(&proto), "rule") else {
                continue; // e.g. an order on booleans: not a rule
            };
            rules_tried += 1;
            let by_rust: BTreeSet<&str> = contacts
                .iter()
                .filter(|(_, c)| rule.matches(c))
                .map(|(id, _)| id.as_str())
                .collect();
            let mut params = SqlParams::starting_at(2);
            let predicate = rule.to_sql(&mut params);
            let sql = format!(
                "SELECT line_user_id FROM contacts c WHERE c.tenant_id = $1 AND {predicate}"
            );
            let query = params.bind(sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&tenant));
            let by_sql: Vec<String> = query
                .fetch_all(&pool)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {sql} failed: {e}"))
                .iter()
                .map(|row| row.get(0))
                .collect();
            let by_sql: BTreeSet<&str> = by_sql.iter().map(String::as_str).collect();
            assert_eq!(
                by_rust, by_sql,
                "seed {seed}: the evaluators disagree on {rule:?}\nSQL: {sql}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 600);
}
