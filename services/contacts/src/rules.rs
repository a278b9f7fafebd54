//! Segment rules: validation (INVALID_ARGUMENT naming the offending node),
//! what a rule reads (so a mutation re-evaluates only the segments it can
//! affect), and two evaluators that must agree:
//! - [`Rule::matches`], in Rust, for one contact inside a mutation's
//!   transaction (incremental maintenance);
//! - [`Rule::to_sql`], a SQL predicate over `contacts c`, for computing a
//!   segment's members set-wise and for the bulk import.
//!
//! Semantics, the same in both:
//! - `has_tag t`: the contact has tag `t`;
//! - `follow_state s`: the contact's follow state is `s`;
//! - an attribute comparison holds only when the contact has the attribute
//!   *with the operand's type*; so `ne` means "has it, of that type, with
//!   another value", and a contact without the attribute matches neither
//!   `eq` nor `ne` (use `not { exists }` for "has no such attribute");
//! - strings order by code point, numbers numerically, timestamps in time;
//! - `contains` is a case-sensitive substring test on strings;
//! - `all`, `any` and `not` are the usual connectives.

use std::collections::BTreeSet;

use hibiki_proto::contacts::v1::{
    AttributeCondition, Comparison, FollowState, SegmentRule, segment_rule::Node,
};

use crate::attrs::{self, AttrType, AttrValue, Attributes};
use crate::error::{Error, Result};

/// The deepest nesting a rule may have.
pub const MAX_DEPTH: usize = 16;
/// The most nodes a rule may have.
pub const MAX_NODES: usize = 256;

/// What a rule is evaluated against.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContactState {
    /// `FollowState` as its protobuf number.
    pub follow_state: i32,
    /// Tags.
    pub tags: BTreeSet<String>,
    /// Attributes.
    pub attributes: Attributes,
}

/// A comparison of one attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmp {
    /// Equal.
    Eq(AttrValue),
    /// Present with the operand's type and another value.
    Ne(AttrValue),
    /// Less than.
    Lt(AttrValue),
    /// Less than or equal.
    Le(AttrValue),
    /// Greater than.
    Gt(AttrValue),
    /// Greater than or equal.
    Ge(AttrValue),
    /// Equal to one of (all of one type).
    In(Vec<AttrValue>),
    /// A string containing this.
    Contains(String),
    /// Present, of any type.
    Exists,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Every child holds.
    All(Vec<Rule>),
    /// At least one child holds.
    Any(Vec<Rule>),
    /// The child does not hold.
    Not(Box<Rule>),
    /// The contact has the tag.
    HasTag(String),
    /// An attribute comparison.
    Attr {
        /// The key.
        key: String,
        /// The comparison.
        cmp: Cmp,
    },
    /// The follow state is this one.
    Follow(i32),
}

/// What a rule reads: a mutation that changes none of it cannot change the
/// rule's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    /// Tags read by `has_tag`.
    pub tags: BTreeSet<String>,
    /// Attribute keys compared.
    pub attributes: BTreeSet<String>,
    /// Whether the follow state is read.
    pub follow: bool,
}

struct Parser {
    nodes: usize,
}

impl Parser {
    fn parse(&mut self, rule: Option<&SegmentRule>, path: &str, depth: usize) -> Result<Rule> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Error::invalid(
                path,
                format!("a rule has at most {MAX_NODES} nodes"),
            ));
        }
        if depth > MAX_DEPTH {
            return Err(Error::invalid(
                path,
                format!("a rule nests at most {MAX_DEPTH} deep"),
            ));
        }
        let Some(node) = rule.and_then(|r| r.node.as_ref()) else {
            return Err(Error::invalid(
                path,
                "a rule node is required (all, any, not, has_tag, attribute or follow_state)",
            ));
        };
        Ok(match node {
            Node::All(list) | Node::Any(list) => {
                let kind = if matches!(node, Node::All(_)) {
                    "all"
                } else {
                    "any"
                };
                if list.rules.is_empty() {
                    return Err(Error::invalid(
                        format!("{path}.{kind}"),
                        "needs at least one rule",
                    ));
                }
                let children = list
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| self.parse(Some(r), &format!("{path}.{kind}[{i}]"), depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                if kind == "all" {
                    Rule::All(children)
                } else {
                    Rule::Any(children)
                }
            }
            Node::Not(inner) => Rule::Not(Box::new(self.parse(
                Some(inner),
                &format!("{path}.not"),
                depth + 1,
            )?)),
            Node::HasTag(t) => {
                attrs::check_name(&format!("{path}.has_tag.tag"), &t.tag)?;
                Rule::HasTag(t.tag.clone())
            }
            Node::Attribute(a) => parse_attribute(a, &format!("{path}.attribute"))?,
            Node::FollowState(s) => {
                if FollowState::try_from(*s).is_err() {
                    return Err(Error::invalid(
                        format!("{path}.follow_state"),
                        format!("{s} is not a follow state"),
                    ));
                }
                Rule::Follow(*s)
            }
        })
    }
}

fn parse_attribute(a: &AttributeCondition, path: &str) -> Result<Rule> {
    attrs::check_name(&format!("{path}.key"), &a.key)?;
    let op = Comparison::try_from(a.op).unwrap_or(Comparison::Unspecified);
    let value_path = format!("{path}.value");
    let needs_value = !matches!(
        op,
        Comparison::In | Comparison::Exists | Comparison::Unspecified
    );
    if !needs_value && a.value.is_some() {
        return Err(Error::invalid(
            &value_path,
            format!("must be unset for {}", op.as_str_name()),
        ));
    }
    if op != Comparison::In && !a.values.is_empty() {
        return Err(Error::invalid(
            format!("{path}.values"),
            "only IN takes values",
        ));
    }
    let value = || AttrValue::from_proto(&value_path, a.value.as_ref());
    let ordered = |v: AttrValue| -> Result<AttrValue> {
        if v.kind() == AttrType::Bool {
            return Err(Error::invalid(
                &value_path,
                "booleans have no order: use EQ or NE",
            ));
        }
        Ok(v)
    };
    let cmp = match op {
        Comparison::Unspecified => {
            return Err(Error::invalid(
                format!("{path}.op"),
                "a comparison is required",
            ));
        }
        Comparison::Eq => Cmp::Eq(value()?),
        Comparison::Ne => Cmp::Ne(value()?),
        Comparison::Lt => Cmp::Lt(ordered(value()?)?),
        Comparison::Le => Cmp::Le(ordered(value()?)?),
        Comparison::Gt => Cmp::Gt(ordered(value()?)?),
        Comparison::Ge => Cmp::Ge(ordered(value()?)?),
        Comparison::Contains => match value()? {
            AttrValue::Str(s) => Cmp::Contains(s),
            other => {
                return Err(Error::invalid(
                    &value_path,
                    format!("CONTAINS takes a string, not a {}", other.kind().name()),
                ));
            }
        },
        Comparison::Exists => Cmp::Exists,
        Comparison::In => {
            if a.values.is_empty() {
                return Err(Error::invalid(
                    format!("{path}.values"),
                    "IN needs at least one value",
                ));
            }
            let values = a
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| AttrValue::from_proto(&format!("{path}.values[{i}]"), Some(v)))
                .collect::<Result<Vec<_>>>()?;
            let first = values[0].kind();
            if let Some(i) = values.iter().position(|v| v.kind() != first) {
                return Err(Error::invalid(
                    format!("{path}.values[{i}]"),
                    format!("all IN values must be of one type ({})", first.name()),
                ));
            }
            Cmp::In(values)
        }
    };
    Ok(Rule::Attr {
        key: a.key.clone(),
        cmp,
    })
}

/// Compares two values of the same type; `None` across types.
fn order(a: &AttrValue, b: &AttrValue) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (AttrValue::Str(x), AttrValue::Str(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (AttrValue::Num(x), AttrValue::Num(y)) => x.partial_cmp(y),
        (AttrValue::Ts(x), AttrValue::Ts(y)) => Some(x.cmp(y)),
        (AttrValue::Bool(x), AttrValue::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Rule {
    /// Validates a protobuf rule; `path` is the request field holding it
    /// (e.g. `rule`), used in error messages.
    pub fn parse(rule: Option<&SegmentRule>, path: &str) -> Result<Rule> {
        Parser { nodes: 0 }.parse(rule, path, 0)
    }

    /// What the rule reads.
    pub fn refs(&self) -> Refs {
        let mut refs = Refs::default();
        self.collect(&mut refs);
        refs
    }

    fn collect(&self, refs: &mut Refs) {
        match self {
            Rule::All(c) | Rule::Any(c) => c.iter().for_each(|r| r.collect(refs)),
            Rule::Not(r) => r.collect(refs),
            Rule::HasTag(t) => {
                refs.tags.insert(t.clone());
            }
            Rule::Attr { key, .. } => {
                refs.attributes.insert(key.clone());
            }
            Rule::Follow(_) => refs.follow = true,
        }
    }

    /// Whether `contact` satisfies the rule.
    pub fn matches(&self, contact: &ContactState) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Rule::All(c) => c.iter().all(|r| r.matches(contact)),
            Rule::Any(c) => c.iter().any(|r| r.matches(contact)),
            Rule::Not(r) => !r.matches(contact),
            Rule::HasTag(t) => contact.tags.contains(t),
            Rule::Follow(s) => contact.follow_state == *s,
            Rule::Attr { key, cmp } => {
                let Some(have) = contact.attributes.get(key) else {
                    return false;
                };
                match cmp {
                    Cmp::Exists => true,
                    Cmp::Eq(v) => order(have, v) == Some(Equal),
                    Cmp::Ne(v) => matches!(order(have, v), Some(Less | Greater)),
                    Cmp::Lt(v) => order(have, v) == Some(Less),
                    Cmp::Le(v) => matches!(order(have, v), Some(Less | Equal)),
                    Cmp::Gt(v) => order(have, v) == Some(Greater),
                    Cmp::Ge(v) => matches!(order(have, v), Some(Greater | Equal)),
                    Cmp::In(vs) => vs.iter().any(|v| order(have, v) == Some(Equal)),
                    Cmp::Contains(s) => matches!(have, AttrValue::Str(h) if h.contains(s.as_str())),
                }
            }
        }
    }

    /// A SQL predicate over `contacts c` that holds exactly when
    /// [`Rule::matches`] does (never NULL). Parameters are appended to
    /// `params`, numbered after those already there.
    pub fn to_sql(&self, params: &mut SqlParams) -> String {
        match self {
            Rule::All(c) | Rule::Any(c) => {
                let op = if matches!(self, Rule::All(_)) {
                    " AND "
                } else {
                    " OR "
                };
                let parts: Vec<String> = c.iter().map(|r| r.to_sql(params)).collect();
                format!("({})", parts.join(op))
            }
            Rule::Not(r) => format!("(NOT {})", r.to_sql(params)),
            Rule::HasTag(t) => {
                let p = params.push(SqlParam::Text(t.clone()));
                format!("(c.tags @> ARRAY[{p}]::text[])")
            }
            Rule::Follow(s) => {
                let p = params.push(SqlParam::Int(i64::from(*s)));
                format!("(c.follow_state = {p})")
            }
            Rule::Attr { key, cmp } => attribute_sql(key, cmp, params),
        }
    }
}

/// `jsonb_typeof` of each attribute type as stored.
fn json_type(t: AttrType) -> &'static str {
    match t {
        AttrType::Str => "string",
        AttrType::Num => "number",
        AttrType::Bool => "boolean",
        AttrType::Ts => "object",
    }
}

/// The SQL expression reading attribute `k` (a parameter) as type `t`. Only
/// evaluated once the type is known to be right (inside CASE), since the
/// casts fail on other types.
fn typed_value(k: &str, t: AttrType) -> String {
    match t {
        AttrType::Str => format!("((c.attributes ->> {k}) COLLATE \"C\")"),
        AttrType::Num => format!("((c.attributes ->> {k})::float8)"),
        AttrType::Bool => format!("((c.attributes ->> {k})::boolean)"),
        AttrType::Ts => format!("((c.attributes -> {k} ->> 'ts')::bigint)"),
    }
}

fn value_param(v: &AttrValue, params: &mut SqlParams) -> String {
    match v {
        AttrValue::Str(s) => format!("({} COLLATE \"C\")", params.push(SqlParam::Text(s.clone()))),
        AttrValue::Num(n) => format!("{}::float8", params.push(SqlParam::Float(*n))),
        AttrValue::Bool(b) => format!("{}::boolean", params.push(SqlParam::Bool(*b))),
        AttrValue::Ts(t) => format!("{}::bigint", params.push(SqlParam::Int(*t))),
    }
}

fn attribute_sql(key: &str, cmp: &Cmp, params: &mut SqlParams) -> String {
    let k = params.push(SqlParam::Text(key.to_owned()));
    let (t, test) = match cmp {
        Cmp::Exists => return format!("((c.attributes -> {k}) IS NOT NULL)"),
        Cmp::Eq(v) | Cmp::Ne(v) | Cmp::Lt(v) | Cmp::Le(v) | Cmp::Gt(v) | Cmp::Ge(v) => {
            let op = match cmp {
                Cmp::Eq(_) => "=",
                Cmp::Ne(_) => "<>",
                Cmp::Lt(_) => "<",
                Cmp::Le(_) => "<=",
                Cmp::Gt(_) => ">",
                _ => ">=",
            };
            let t = v.kind();
            (
                t,
                format!("{} {op} {}", typed_value(&k, t), value_param(v, params)),
            )
        }
        Cmp::In(vs) => {
            let t = vs[0].kind();
            let (p, cast) = match t {
                AttrType::Str => (
                    params.push(SqlParam::TextArray(
                        vs.iter()
                            .filter_map(|v| match v {
                                AttrValue::Str(s) => Some(s.clone()),
                                _ => None,
                            })
                            .collect(),
                    )),
                    "text[]",
                ),
                AttrType::Num => (
                    params.push(SqlParam::FloatArray(
                        vs.iter()
                            .filter_map(|v| match v {
                                AttrValue::Num(n) => Some(*n),
                                _ => None,
                            })
                            .collect(),
                    )),
                    "float8[]",
                ),
                AttrType::Bool => (
                    params.push(SqlParam::BoolArray(
                        vs.iter()
                            .filter_map(|v| match v {
                                AttrValue::Bool(b) => Some(*b),
                                _ => None,
                            })
                            .collect(),
                    )),
                    "boolean[]",
                ),
                AttrType::Ts => (
                    params.push(SqlParam::IntArray(
                        vs.iter()
                            .filter_map(|v| match v {
                                AttrValue::Ts(t) => Some(*t),
                                _ => None,
                            })
                            .collect(),
                    )),
                    "bigint[]",
                ),
            };
            (t, format!("{} = ANY({p}::{cast})", typed_value(&k, t)))
        }
        Cmp::Contains(s) => {
            let p = params.push(SqlParam::Text(s.clone()));
            (
                AttrType::Str,
                format!("strpos(c.attributes ->> {k}, {p}) > 0"),
            )
        }
    };
    let ts_guard = if t == AttrType::Ts {
        format!(" AND (c.attributes -> {k}) ? 'ts'")
    } else {
        String::new()
    };
    format!(
        "COALESCE(CASE WHEN jsonb_typeof(c.attributes -> {k}) = '{}'{ts_guard} THEN {test} ELSE false END, false)",
        json_type(t)
    )
}

/// A parameter of a compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParam {
    /// `text`.
    Text(String),
    /// `bigint`.
    Int(i64),
    /// `float8`.
    Float(f64),
    /// `boolean`.
    Bool(bool),
    /// `text[]`.
    TextArray(Vec<String>),
    /// `bigint[]`.
    IntArray(Vec<i64>),
    /// `float8[]`.
    FloatArray(Vec<f64>),
    /// `boolean[]`.
    BoolArray(Vec<bool>),
}

/// Parameters of a query under construction, numbered `$first`, `$first+1`…
#[derive(Debug, Clone)]
pub struct SqlParams {
    first: usize,
    params: Vec<SqlParam>,
}

impl SqlParams {
    /// Parameters numbered from `$first` (the query binds `$1..$first-1`
    /// itself).
    pub fn starting_at(first: usize) -> Self {
        Self {
            first,
            params: Vec::new(),
        }
    }

    /// Adds one and returns its placeholder.
    pub fn push(&mut self, p: SqlParam) -> String {
        self.params.push(p);
        format!("${}", self.first + self.params.len() - 1)
    }

    /// Binds the parameters, in order, to `query`.
    pub fn bind<'q>(
        &self,
        mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        for p in &self.params {
            query = match p.clone() {
                SqlParam::Text(v) => query.bind(v),
                SqlParam::Int(v) => query.bind(v),
                SqlParam::Float(v) => query.bind(v),
                SqlParam::Bool(v) => query.bind(v),
                SqlParam::TextArray(v) => query.bind(v),
                SqlParam::IntArray(v) => query.bind(v),
                SqlParam::FloatArray(v) => query.bind(v),
                SqlParam::BoolArray(v) => query.bind(v),
            };
        }
        query
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hibiki_proto::common::v1::{Value, value::Kind};
    use hibiki_proto::contacts::v1::{HasTag, RuleList};

    fn tag(t: &str) -> SegmentRule {
        SegmentRule {
            node: Some(Node::HasTag(HasTag { tag: t.into() })),
        }
    }

    fn attr(key: &str, op: Comparison, value: Option<Kind>) -> SegmentRule {
        SegmentRule {
            node: Some(Node::Attribute(AttributeCondition {
                key: key.into(),
                op: op as i32,
                value: value.map(|k| Value { kind: Some(k) }),
                values: vec![],
            })),
        }
    }

    fn all(rules: Vec<SegmentRule>) -> SegmentRule {
        SegmentRule {
            node: Some(Node::All(RuleList { rules })),
        }
    }

    fn error_of(rule: SegmentRule) -> String {
        Rule::parse(Some(&rule), "rule").unwrap_err().to_string()
    }

    #[test]
    fn invalid_rules_name_the_offending_node() {
        assert!(error_of(all(vec![])).starts_with("rule.all: "));
        assert!(
            error_of(all(vec![tag("a"), SegmentRule { node: None }])).starts_with("rule.all[1]: ")
        );
        assert!(error_of(all(vec![tag("a"), tag("")])).starts_with("rule.all[1].has_tag.tag: "));
        assert!(
            error_of(all(vec![attr(
                "vip",
                Comparison::Lt,
                Some(Kind::BoolValue(true))
            )]))
            .starts_with("rule.all[0].attribute.value: ")
        );
        assert!(
            error_of(attr(
                "city",
                Comparison::Contains,
                Some(Kind::NumberValue(1.0))
            ))
            .starts_with("rule.attribute.value: ")
        );
        assert!(
            error_of(attr("city", Comparison::Unspecified, None))
                .starts_with("rule.attribute.op: ")
        );
        assert!(error_of(attr("city", Comparison::Eq, None)).starts_with("rule.attribute.value: "));
        assert!(
            error_of(attr(
                "city",
                Comparison::Exists,
                Some(Kind::StringValue("x".into()))
            ))
            .starts_with("rule.attribute.value: ")
        );
        let mut mixed = attr("age", Comparison::In, None);
        if let Some(Node::Attribute(a)) = &mut mixed.node {
            a.values = vec![
                Value {
                    kind: Some(Kind::NumberValue(1.0)),
                },
                Value {
                    kind: Some(Kind::StringValue("2".into())),
                },
            ];
        }
        assert!(error_of(mixed).starts_with("rule.attribute.values[1]: "));
        let mut deep = tag("x");
        for _ in 0..20 {
            deep = SegmentRule {
                node: Some(Node::Not(Box::new(deep))),
            };
        }
        assert!(error_of(deep).contains("nests at most"));
    }

    #[test]
    fn refs_list_what_the_rule_reads() {
        let rule = Rule::parse(
            Some(&all(vec![
                tag("campaign:spring"),
                attr("age", Comparison::Ge, Some(Kind::NumberValue(20.0))),
                SegmentRule {
                    node: Some(Node::FollowState(FollowState::Following as i32)),
                },
            ])),
            "rule",
        )
        .unwrap();
        let refs = rule.refs();
        assert_eq!(
            refs.tags.into_iter().collect::<Vec<_>>(),
            ["campaign:spring"]
        );
        assert_eq!(refs.attributes.into_iter().collect::<Vec<_>>(), ["age"]);
        assert!(refs.follow);
    }

    #[test]
    fn comparisons_hold_only_for_the_operands_type() {
        let mut c = ContactState::default();
        c.attributes
            .insert("age".into(), AttrValue::Str("30".into()));
        let eq = Rule::parse(
            Some(&attr("age", Comparison::Eq, Some(Kind::NumberValue(30.0)))),
            "r",
        )
        .unwrap();
        let ne = Rule::parse(
            Some(&attr("age", Comparison::Ne, Some(Kind::NumberValue(30.0)))),
            "r",
        )
        .unwrap();
        assert!(!eq.matches(&c));
        assert!(!ne.matches(&c));
        c.attributes.insert("age".into(), AttrValue::Num(31.0));
        assert!(!eq.matches(&c));
        assert!(ne.matches(&c));
    }
}
