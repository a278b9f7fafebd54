//! Scenario definitions: the YAML operators write, its mapping onto
//! `ScenarioDefinition`, and the checks every definition passes on apply
//! (YAML or protobuf alike), each naming the path of the bad field.
//!
//! ```yaml
//! name: spring campaign
//! description: A tap on the carousel joins the spring campaign.
//! channel: "1000000001"            # optional: only this channel's events
//! trigger:
//!   postback: { param: { key: campaign, value: spring } }
//! steps:
//!   - id: tag
//!     add_tags: [campaign:spring]
//!   - id: menu
//!     switch_rich_menu: { alias: campaign }
//!   - id: thanks
//!     send_messages:
//!       messages:
//!         - { type: text, text: "Thanks for joining!" }
//! options:
//!   reentry: once                   # not_while_running (default) | once | every_time
//!   quiet_hours: { start: "22:00", end: "08:00" }
//! ```
//!
//! Triggers: `follow: { kind: any | new | refollow }`, `unfollow: {}`,
//! `postback: { exact | prefix | param: { key, value } }`,
//! `text: { exact | contains | regex, case_insensitive }`,
//! `segment_entered: { segment_id }`, `segment_exited: { segment_id }`,
//! `manual: {}`.
//!
//! Steps (each with an `id`): `add_tags`, `remove_tags` (lists),
//! `set_attributes` (a map; numbers, booleans and strings as written,
//! `{ timestamp: "2026-04-01T09:00:00+09:00" }` for instants),
//! `switch_rich_menu: { alias | rich_menu_id }`,
//! `send_messages: { messages: [LINE message objects], notification_disabled }`,
//! `wait: { duration: "3d" | "1h30m" | "90s" }` or `wait: { time_of_day: "09:00" }`,
//! `branch: { if: <condition>, then: [steps], else: [steps] }`, `stop: {}`.
//!
//! Conditions: `{ has_tag: x }`, `{ in_segment: id }`, `{ all: [...] }`,
//! `{ any: [...] }`, `{ not: <condition> }`,
//! `{ attribute: { key, op: eq | ne | lt | le | gt | ge | in | contains | exists, value, values } }`.

use std::collections::{BTreeMap, HashSet};

use hibiki_proto::common::v1::{Value as ProtoValue, value::Kind};
use hibiki_proto::contacts::v1::{AttributeCondition, Comparison};
use hibiki_proto::scenario::v1::{
    BranchAction, Condition, ConditionList, FollowKind, FollowTrigger, KeyValue, ManualTrigger,
    Options, PostbackTrigger, QuietHours, ReentryPolicy, ScenarioDefinition, SegmentTrigger,
    SendMessagesAction, SetAttributesAction, Step, StopAction, SwitchRichMenuAction, TagsAction,
    TextTrigger, TimeOfDay, Trigger, UnfollowTrigger, WaitAction, condition, postback_trigger,
    step, switch_rich_menu_action, text_trigger, trigger, wait_action,
};
use serde::Deserialize;

/// The most steps a scenario holds, nested ones included.
pub const MAX_STEPS: usize = 100;
/// The longest wait.
pub const MAX_WAIT_SECS: i64 = 366 * 24 * 3600;

/// A definition that is not valid: the path of the bad field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Invalid {
    /// Where, e.g. `steps[2].branch.then[0].send_messages.messages[0]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.into(),
        message: message.into(),
    }
}

// ------------------------------------------------------------------ YAML

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlScenario {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    channel: Option<String>,
    trigger: YamlTrigger,
    steps: Vec<YamlStep>,
    #[serde(default)]
    options: YamlOptions,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum YamlTrigger {
    Follow(#[serde(default)] YamlFollow),
    Unfollow(#[serde(default)] Empty),
    Postback(YamlMatch),
    Text(YamlText),
    SegmentEntered(YamlSegment),
    SegmentExited(YamlSegment),
    Manual(#[serde(default)] Empty),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlFollow {
    #[serde(default)]
    kind: YamlFollowKind,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum YamlFollowKind {
    #[default]
    Any,
    New,
    Refollow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlMatch {
    exact: Option<String>,
    prefix: Option<String>,
    param: Option<YamlKeyValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlKeyValue {
    key: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlText {
    exact: Option<String>,
    contains: Option<String>,
    regex: Option<String>,
    #[serde(default)]
    case_insensitive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlSegment {
    segment_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlStep {
    id: String,
    #[serde(flatten)]
    action: YamlAction,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum YamlAction {
    AddTags(Vec<String>),
    RemoveTags(Vec<String>),
    SetAttributes(BTreeMap<String, YamlValue>),
    SwitchRichMenu(YamlMenu),
    SendMessages(YamlSend),
    Wait(YamlWait),
    Branch(Box<YamlBranch>),
    Stop(#[serde(default)] Empty),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum YamlValue {
    Bool(bool),
    Number(f64),
    String(String),
    Timestamp { timestamp: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlMenu {
    alias: Option<String>,
    rich_menu_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlSend {
    messages: Vec<serde_json::Value>,
    #[serde(default)]
    notification_disabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlWait {
    duration: Option<String>,
    time_of_day: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlBranch {
    #[serde(rename = "if")]
    condition: YamlCondition,
    #[serde(default)]
    then: Vec<YamlStep>,
    #[serde(default, rename = "else")]
    otherwise: Vec<YamlStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum YamlCondition {
    HasTag(String),
    InSegment(String),
    All(Vec<YamlCondition>),
    Any(Vec<YamlCondition>),
    Not(Box<YamlCondition>),
    Attribute(YamlAttribute),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlAttribute {
    key: String,
    op: String,
    value: Option<YamlValue>,
    #[serde(default)]
    values: Vec<YamlValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlOptions {
    #[serde(default)]
    reentry: Option<String>,
    #[serde(default)]
    quiet_hours: Option<YamlQuiet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlQuiet {
    start: String,
    end: String,
}

/// Reads a YAML definition. Errors name the path of the bad field (or the
/// line and column when the text is not YAML at all).
pub fn from_yaml(text: &str) -> Result<ScenarioDefinition, Invalid> {
    // Kinds are written as one-key maps (`follow: {}`), not YAML tags; the
    // path tracker sits under that adapter so errors keep their path.
    let de = yaml_serde::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(de, &mut track);
    let parsed: Result<YamlScenario, _> =
        yaml_serde::with::singleton_map_recursive::deserialize(tracked);
    let parsed = parsed.map_err(|e| {
        let path = track.path().to_string();
        let path = if path == "." { "yaml".to_owned() } else { path };
        invalid(path, e.to_string())
    })?;
    parsed.into_proto()
}

fn parse_hhmm(text: &str, path: &str) -> Result<TimeOfDay, Invalid> {
    let bad = || {
        invalid(
            path,
            format!("{text:?} is not a time of day (HH:MM, 00:00 to 23:59)"),
        )
    };
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let (hour, minute): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if hour > 23 || minute > 59 || m.len() != 2 {
        return Err(bad());
    }
    Ok(TimeOfDay { hour, minute })
}

/// Reads `3d`, `1h30m`, `90s`, `2w` (weeks, days, hours, minutes, seconds).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total: u64 = 0;
    let mut number = String::new();
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'w' => 7 * 86_400,
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !number.is_empty() {
        return None;
    }
    Some(std::time::Duration::from_secs(total))
}

fn value_of(v: YamlValue, path: &str) -> Result<ProtoValue, Invalid> {
    let kind = match v {
        YamlValue::Bool(b) => Kind::BoolValue(b),
        YamlValue::Number(n) => Kind::NumberValue(n),
        YamlValue::String(s) => Kind::StringValue(s),
        YamlValue::Timestamp { timestamp } => {
            let t = chrono::DateTime::parse_from_rfc3339(&timestamp).map_err(|e| {
                invalid(
                    format!("{path}.timestamp"),
                    format!("{timestamp:?} is not an RFC 3339 time: {e}"),
                )
            })?;
            Kind::TimestampValue(hibiki_runtime::timestamp::to_proto(t.to_utc()))
        }
    };
    Ok(ProtoValue { kind: Some(kind) })
}

impl YamlScenario {
    fn into_proto(self) -> Result<ScenarioDefinition, Invalid> {
        let trigger = match self.trigger {
            YamlTrigger::Follow(f) => trigger::Kind::Follow(FollowTrigger {
                kind: match f.kind {
                    YamlFollowKind::Any => FollowKind::Any,
                    YamlFollowKind::New => FollowKind::New,
                    YamlFollowKind::Refollow => FollowKind::Refollow,
                } as i32,
            }),
            YamlTrigger::Unfollow(_) => trigger::Kind::Unfollow(UnfollowTrigger {}),
            YamlTrigger::Postback(m) => {
                let set = [m.exact.is_some(), m.prefix.is_some(), m.param.is_some()];
                if set.iter().filter(|s| **s).count() != 1 {
                    return Err(invalid(
                        "trigger.postback",
                        "exactly one of exact, prefix or param must be set",
                    ));
                }
                trigger::Kind::Postback(PostbackTrigger {
                    r#match: Some(match (m.exact, m.prefix, m.param) {
                        (Some(e), _, _) => postback_trigger::Match::Exact(e),
                        (_, Some(p), _) => postback_trigger::Match::Prefix(p),
                        (_, _, Some(kv)) => postback_trigger::Match::Param(KeyValue {
                            key: kv.key,
                            value: kv.value,
                        }),
                        _ => unreachable!("one is set"),
                    }),
                })
            }
            YamlTrigger::Text(t) => {
                let set = [t.exact.is_some(), t.contains.is_some(), t.regex.is_some()];
                if set.iter().filter(|s| **s).count() != 1 {
                    return Err(invalid(
                        "trigger.text",
                        "exactly one of exact, contains or regex must be set",
                    ));
                }
                trigger::Kind::Text(TextTrigger {
                    r#match: Some(match (t.exact, t.contains, t.regex) {
                        (Some(e), _, _) => text_trigger::Match::Exact(e),
                        (_, Some(c), _) => text_trigger::Match::Contains(c),
                        (_, _, Some(r)) => text_trigger::Match::Regex(r),
                        _ => unreachable!("one is set"),
                    }),
                    case_insensitive: t.case_insensitive,
                })
            }
            YamlTrigger::SegmentEntered(s) => trigger::Kind::SegmentEntered(SegmentTrigger {
                segment_id: s.segment_id,
            }),
            YamlTrigger::SegmentExited(s) => trigger::Kind::SegmentExited(SegmentTrigger {
                segment_id: s.segment_id,
            }),
            YamlTrigger::Manual(_) => trigger::Kind::Manual(ManualTrigger {}),
        };
        let steps = steps_of(self.steps, "steps")?;
        let reentry = match self.options.reentry.as_deref() {
            None | Some("not_while_running") => ReentryPolicy::NotWhileRunning,
            Some("once") => ReentryPolicy::Once,
            Some("every_time") => ReentryPolicy::EveryTime,
            Some(other) => {
                return Err(invalid(
                    "options.reentry",
                    format!("{other:?}: expected not_while_running, once or every_time"),
                ));
            }
        };
        let quiet_hours = match self.options.quiet_hours {
            None => None,
            Some(q) => Some(QuietHours {
                start: Some(parse_hhmm(&q.start, "options.quiet_hours.start")?),
                end: Some(parse_hhmm(&q.end, "options.quiet_hours.end")?),
            }),
        };
        Ok(ScenarioDefinition {
            name: self.name,
            description: self.description,
            trigger: Some(Trigger {
                kind: Some(trigger),
            }),
            steps,
            options: Some(Options {
                reentry: reentry as i32,
                quiet_hours,
            }),
            channel_id: self.channel.unwrap_or_default(),
        })
    }
}

fn steps_of(steps: Vec<YamlStep>, at: &str) -> Result<Vec<Step>, Invalid> {
    steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| step_of(s, &format!("{at}[{i}]")))
        .collect()
}

fn step_of(s: YamlStep, at: &str) -> Result<Step, Invalid> {
    let action = match s.action {
        YamlAction::AddTags(tags) => step::Action::AddTags(TagsAction { tags }),
        YamlAction::RemoveTags(tags) => step::Action::RemoveTags(TagsAction { tags }),
        YamlAction::SetAttributes(map) => {
            let mut set = std::collections::HashMap::new();
            for (k, v) in map {
                let value = value_of(v, &format!("{at}.set_attributes.{k}"))?;
                set.insert(k, value);
            }
            step::Action::SetAttributes(SetAttributesAction { set })
        }
        YamlAction::SwitchRichMenu(m) => step::Action::SwitchRichMenu(SwitchRichMenuAction {
            menu: match (m.alias, m.rich_menu_id) {
                (Some(a), None) => Some(switch_rich_menu_action::Menu::Alias(a)),
                (None, Some(id)) => Some(switch_rich_menu_action::Menu::RichMenuId(id)),
                _ => {
                    return Err(invalid(
                        format!("{at}.switch_rich_menu"),
                        "exactly one of alias or rich_menu_id must be set",
                    ));
                }
            },
        }),
        YamlAction::SendMessages(send) => step::Action::SendMessages(SendMessagesAction {
            messages_json: send.messages.iter().map(|m| m.to_string()).collect(),
            notification_disabled: send.notification_disabled,
        }),
        YamlAction::Wait(w) => step::Action::Wait(WaitAction {
            until: match (w.duration, w.time_of_day) {
                (Some(d), None) => {
                    let path = format!("{at}.wait.duration");
                    let parsed = parse_duration(&d).ok_or_else(|| {
                        invalid(
                            &path,
                            format!("{d:?} is not a duration (e.g. 3d, 1h30m, 90s)"),
                        )
                    })?;
                    Some(wait_action::Until::Duration(prost_types::Duration {
                        seconds: parsed.as_secs() as i64,
                        nanos: 0,
                    }))
                }
                (None, Some(t)) => Some(wait_action::Until::TimeOfDay(parse_hhmm(
                    &t,
                    &format!("{at}.wait.time_of_day"),
                )?)),
                _ => {
                    return Err(invalid(
                        format!("{at}.wait"),
                        "exactly one of duration or time_of_day must be set",
                    ));
                }
            },
        }),
        YamlAction::Branch(b) => step::Action::Branch(BranchAction {
            condition: Some(condition_of(b.condition, &format!("{at}.branch.if"))?),
            then: steps_of(b.then, &format!("{at}.branch.then"))?,
            otherwise: steps_of(b.otherwise, &format!("{at}.branch.else"))?,
        }),
        YamlAction::Stop(_) => step::Action::Stop(StopAction {}),
    };
    Ok(Step {
        id: s.id,
        action: Some(action),
    })
}

fn condition_of(c: YamlCondition, at: &str) -> Result<Condition, Invalid> {
    let node = match c {
        YamlCondition::HasTag(t) => condition::Node::HasTag(t),
        YamlCondition::InSegment(s) => condition::Node::InSegment(s),
        YamlCondition::All(list) | YamlCondition::Any(list) if list.is_empty() => {
            return Err(invalid(at, "all / any need at least one condition"));
        }
        YamlCondition::All(list) => condition::Node::All(ConditionList {
            conditions: list
                .into_iter()
                .enumerate()
                .map(|(i, c)| condition_of(c, &format!("{at}.all[{i}]")))
                .collect::<Result<_, _>>()?,
        }),
        YamlCondition::Any(list) => condition::Node::Any(ConditionList {
            conditions: list
                .into_iter()
                .enumerate()
                .map(|(i, c)| condition_of(c, &format!("{at}.any[{i}]")))
                .collect::<Result<_, _>>()?,
        }),
        YamlCondition::Not(inner) => {
            condition::Node::Not(Box::new(condition_of(*inner, &format!("{at}.not"))?))
        }
        YamlCondition::Attribute(a) => {
            let op = match a.op.as_str() {
                "eq" => Comparison::Eq,
                "ne" => Comparison::Ne,
                "lt" => Comparison::Lt,
                "le" => Comparison::Le,
                "gt" => Comparison::Gt,
                "ge" => Comparison::Ge,
                "in" => Comparison::In,
                "contains" => Comparison::Contains,
                "exists" => Comparison::Exists,
                other => {
                    return Err(invalid(
                        format!("{at}.attribute.op"),
                        format!(
                            "{other:?}: expected eq, ne, lt, le, gt, ge, in, contains or exists"
                        ),
                    ));
                }
            };
            let value = a
                .value
                .map(|v| value_of(v, &format!("{at}.attribute.value")))
                .transpose()?;
            let values = a
                .values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_of(v, &format!("{at}.attribute.values[{i}]")))
                .collect::<Result<_, _>>()?;
            condition::Node::Attribute(AttributeCondition {
                key: a.key,
                op: op as i32,
                value,
                values,
            })
        }
    };
    Ok(Condition { node: Some(node) })
}

// ------------------------------------------------------------------ checks

fn check_step_id(id: &str, at: &str, seen: &mut HashSet<String>) -> Result<(), Invalid> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(invalid(
            format!("{at}.id"),
            format!("{id:?}: 1 to 64 letters, digits, '-' or '_'"),
        ));
    }
    if !seen.insert(id.to_owned()) {
        return Err(invalid(
            format!("{at}.id"),
            format!("{id:?} is used by another step"),
        ));
    }
    Ok(())
}

fn check_tags(tags: &[String], at: &str) -> Result<(), Invalid> {
    if tags.is_empty() {
        return Err(invalid(at, "at least one tag"));
    }
    for (i, t) in tags.iter().enumerate() {
        if t.is_empty() || t.chars().count() > 64 || t.chars().any(char::is_control) {
            return Err(invalid(
                format!("{at}[{i}]"),
                format!("{t:?}: 1 to 64 characters, no control characters"),
            ));
        }
    }
    Ok(())
}

fn check_condition(c: &Condition, at: &str, depth: usize) -> Result<(), Invalid> {
    if depth > 16 {
        return Err(invalid(at, "nested more than 16 levels"));
    }
    match &c.node {
        None => Err(invalid(at, "a condition must be set")),
        Some(condition::Node::HasTag(t)) => {
            check_tags(std::slice::from_ref(t), &format!("{at}.has_tag"))
        }
        Some(condition::Node::InSegment(s)) if s.is_empty() => {
            Err(invalid(format!("{at}.in_segment"), "must not be empty"))
        }
        Some(condition::Node::InSegment(_)) => Ok(()),
        Some(condition::Node::All(l)) | Some(condition::Node::Any(l)) => {
            let kind = if matches!(c.node, Some(condition::Node::All(_))) {
                "all"
            } else {
                "any"
            };
            if l.conditions.is_empty() {
                return Err(invalid(format!("{at}.{kind}"), "at least one condition"));
            }
            for (i, child) in l.conditions.iter().enumerate() {
                check_condition(child, &format!("{at}.{kind}[{i}]"), depth + 1)?;
            }
            Ok(())
        }
        Some(condition::Node::Not(inner)) => {
            check_condition(inner, &format!("{at}.not"), depth + 1)
        }
        Some(condition::Node::Attribute(a)) => {
            let at = format!("{at}.attribute");
            if a.key.is_empty() {
                return Err(invalid(format!("{at}.key"), "must not be empty"));
            }
            match a.op() {
                Comparison::Unspecified => Err(invalid(format!("{at}.op"), "must be set")),
                Comparison::Exists => Ok(()),
                Comparison::In if a.values.is_empty() => Err(invalid(
                    format!("{at}.values"),
                    "IN needs at least one value",
                )),
                Comparison::In => Ok(()),
                _ if a.value.as_ref().is_none_or(|v| v.kind.is_none()) => Err(invalid(
                    format!("{at}.value"),
                    "this comparison needs a value",
                )),
                _ => Ok(()),
            }
        }
    }
}

fn check_steps(
    steps: &[Step],
    at: &str,
    seen: &mut HashSet<String>,
    count: &mut usize,
) -> Result<(), Invalid> {
    for (i, s) in steps.iter().enumerate() {
        let at = format!("{at}[{i}]");
        *count += 1;
        if *count > MAX_STEPS {
            return Err(invalid(at, format!("more than {MAX_STEPS} steps in all")));
        }
        check_step_id(&s.id, &at, seen)?;
        match &s.action {
            None => return Err(invalid(at, "an action must be set")),
            Some(step::Action::AddTags(t)) => check_tags(&t.tags, &format!("{at}.add_tags"))?,
            Some(step::Action::RemoveTags(t)) => check_tags(&t.tags, &format!("{at}.remove_tags"))?,
            Some(step::Action::SetAttributes(a)) => {
                if a.set.is_empty() {
                    return Err(invalid(
                        format!("{at}.set_attributes"),
                        "at least one attribute",
                    ));
                }
                for (k, v) in &a.set {
                    if k.is_empty() || k.len() > 64 {
                        return Err(invalid(
                            format!("{at}.set_attributes"),
                            format!("{k:?}: a key is 1 to 64 bytes"),
                        ));
                    }
                    if v.kind.is_none() {
                        return Err(invalid(format!("{at}.set_attributes.{k}"), "no value"));
                    }
                }
            }
            Some(step::Action::SwitchRichMenu(m)) => match &m.menu {
                Some(switch_rich_menu_action::Menu::Alias(a)) if !a.is_empty() => {}
                Some(switch_rich_menu_action::Menu::RichMenuId(id))
                    if id.starts_with("richmenu-") => {}
                Some(switch_rich_menu_action::Menu::RichMenuId(id)) => {
                    return Err(invalid(
                        format!("{at}.switch_rich_menu.rich_menu_id"),
                        format!("{id:?} is not a LINE rich menu id (richmenu-...)"),
                    ));
                }
                _ => {
                    return Err(invalid(
                        format!("{at}.switch_rich_menu"),
                        "alias or rich_menu_id must be set",
                    ));
                }
            },
            Some(step::Action::SendMessages(send)) => {
                let path = format!("{at}.send_messages.messages");
                let n = send.messages_json.len();
                if n == 0 || n > hibiki_line::api::MAX_MESSAGES {
                    return Err(invalid(
                        &path,
                        format!("1 to {} messages, got {n}", hibiki_line::api::MAX_MESSAGES),
                    ));
                }
                for (j, m) in send.messages_json.iter().enumerate() {
                    let at = format!("{path}[{j}]");
                    let value: serde_json::Value = serde_json::from_str(m)
                        .map_err(|e| invalid(&at, format!("not JSON: {e}")))?;
                    if let Some(d) = hibiki_line::api::check_message(&at, &value)
                        .into_iter()
                        .next()
                    {
                        return Err(invalid(d.property, d.message.to_lowercase()));
                    }
                }
            }
            Some(step::Action::Wait(w)) => match &w.until {
                Some(wait_action::Until::Duration(d)) if d.seconds < 1 => {
                    return Err(invalid(format!("{at}.wait.duration"), "at least 1 s"));
                }
                Some(wait_action::Until::Duration(d)) if d.seconds > MAX_WAIT_SECS => {
                    return Err(invalid(format!("{at}.wait.duration"), "at most 366 days"));
                }
                Some(wait_action::Until::TimeOfDay(t)) if t.hour > 23 || t.minute > 59 => {
                    return Err(invalid(format!("{at}.wait.time_of_day"), "00:00 to 23:59"));
                }
                Some(_) => {}
                None => {
                    return Err(invalid(
                        format!("{at}.wait"),
                        "duration or time_of_day must be set",
                    ));
                }
            },
            Some(step::Action::Branch(b)) => {
                let condition = b
                    .condition
                    .as_ref()
                    .ok_or_else(|| invalid(format!("{at}.branch.if"), "must be set"))?;
                check_condition(condition, &format!("{at}.branch.if"), 0)?;
                check_steps(&b.then, &format!("{at}.branch.then"), seen, count)?;
                check_steps(&b.otherwise, &format!("{at}.branch.else"), seen, count)?;
            }
            Some(step::Action::Stop(_)) => {}
        }
    }
    Ok(())
}

/// Checks a definition as applied (from YAML or protobuf).
pub fn check(d: &ScenarioDefinition) -> Result<(), Invalid> {
    if d.name.trim().is_empty() || d.name.chars().count() > 128 {
        return Err(invalid("name", "1 to 128 characters"));
    }
    let trigger = d
        .trigger
        .as_ref()
        .and_then(|t| t.kind.as_ref())
        .ok_or_else(|| invalid("trigger", "a trigger must be set"))?;
    match trigger {
        trigger::Kind::Postback(p) => match &p.r#match {
            None => {
                return Err(invalid(
                    "trigger.postback",
                    "exact, prefix or param must be set",
                ));
            }
            Some(postback_trigger::Match::Param(kv)) if kv.key.is_empty() => {
                return Err(invalid("trigger.postback.param.key", "must not be empty"));
            }
            Some(postback_trigger::Match::Prefix(p)) if p.is_empty() => {
                return Err(invalid("trigger.postback.prefix", "must not be empty"));
            }
            _ => {}
        },
        trigger::Kind::Text(t) => match &t.r#match {
            None => {
                return Err(invalid(
                    "trigger.text",
                    "exact, contains or regex must be set",
                ));
            }
            Some(text_trigger::Match::Regex(r)) => {
                regex::RegexBuilder::new(r)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| {
                        invalid(
                            "trigger.text.regex",
                            format!("not a regular expression: {e}"),
                        )
                    })?;
            }
            Some(text_trigger::Match::Contains(c)) if c.is_empty() => {
                return Err(invalid("trigger.text.contains", "must not be empty"));
            }
            _ => {}
        },
        trigger::Kind::SegmentEntered(s) if s.segment_id.is_empty() => {
            return Err(invalid(
                "trigger.segment_entered.segment_id",
                "must not be empty",
            ));
        }
        trigger::Kind::SegmentExited(s) if s.segment_id.is_empty() => {
            return Err(invalid(
                "trigger.segment_exited.segment_id",
                "must not be empty",
            ));
        }
        _ => {}
    }
    if d.steps.is_empty() {
        return Err(invalid("steps", "at least one step"));
    }
    check_steps(&d.steps, "steps", &mut HashSet::new(), &mut 0)?;
    if let Some(q) = d.options.as_ref().and_then(|o| o.quiet_hours.as_ref()) {
        for (name, t) in [("start", &q.start), ("end", &q.end)] {
            match t {
                Some(t) if t.hour <= 23 && t.minute <= 59 => {}
                _ => {
                    return Err(invalid(
                        format!("options.quiet_hours.{name}"),
                        "a time of day, 00:00 to 23:59",
                    ));
                }
            }
        }
        if q.start == q.end {
            return Err(invalid("options.quiet_hours", "start and end must differ"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPRING: &str = r#"
name: spring campaign
description: A tap on the carousel joins the spring campaign.
trigger:
  postback: { param: { key: campaign, value: spring } }
steps:
  - id: tag
    add_tags: [campaign:spring]
  - id: menu
    switch_rich_menu: { alias: campaign }
  - id: thanks
    send_messages:
      messages:
        - { type: text, text: "Thanks for joining!" }
options:
  reentry: once
  quiet_hours: { start: "22:00", end: "08:00" }
"#;

    #[test]
    fn the_spring_campaign_reads_into_its_definition() {
        let d = from_yaml(SPRING).unwrap();
        check(&d).unwrap();
        assert_eq!(d.name, "spring campaign");
        assert_eq!(d.steps.len(), 3);
        let Some(trigger::Kind::Postback(p)) = d.trigger.unwrap().kind else {
            panic!("a postback trigger")
        };
        assert_eq!(
            p.r#match,
            Some(postback_trigger::Match::Param(KeyValue {
                key: "campaign".into(),
                value: "spring".into()
            }))
        );
        let Some(step::Action::SendMessages(send)) = &d.steps[2].action else {
            panic!("a send")
        };
        let m: serde_json::Value = serde_json::from_str(&send.messages_json[0]).unwrap();
        assert_eq!(m["text"], "Thanks for joining!");
        let options = d.options.unwrap();
        assert_eq!(options.reentry(), ReentryPolicy::Once);
        assert_eq!(
            options.quiet_hours.unwrap().start,
            Some(TimeOfDay {
                hour: 22,
                minute: 0
            })
        );
    }

    fn error(yaml: &str) -> Invalid {
        match from_yaml(yaml) {
            Err(e) => e,
            Ok(d) => check(&d).expect_err("invalid"),
        }
    }

    #[test]
    fn bad_fields_are_named_by_their_path() {
        let base = "name: x\ntrigger: { follow: {} }\nsteps:\n";
        let cases = [
            (format!("{base}  - {{ id: a, add_tag: [x] }}\n"), "steps[0]"),
            (format!("{base}  - {{ id: a, add_tags: [] }}\n"), "steps[0].add_tags"),
            (format!("{base}  - {{ id: 'a b', stop: {{}} }}\n"), "steps[0].id"),
            (
                format!("{base}  - {{ id: a, stop: {{}} }}\n  - {{ id: a, stop: {{}} }}\n"),
                "steps[1].id",
            ),
            (
                format!("{base}  - id: a\n    branch:\n      if: {{ has_tag: vip }}\n      then:\n        - id: b\n          send_messages: {{ messages: [{{ type: text }}] }}\n"),
                "steps[0].branch.then[0].send_messages.messages[0].text",
            ),
            (
                format!("{base}  - {{ id: a, wait: {{ duration: soon }} }}\n"),
                "steps[0].wait.duration",
            ),
            (
                format!("{base}  - {{ id: a, wait: {{ time_of_day: '25:00' }} }}\n"),
                "steps[0].wait.time_of_day",
            ),
            (
                format!("{base}  - {{ id: a, switch_rich_menu: {{ rich_menu_id: menu1 }} }}\n"),
                "steps[0].switch_rich_menu.rich_menu_id",
            ),
            (
                format!("{base}  - id: a\n    branch:\n      if: {{ attribute: {{ key: age, op: gt }} }}\n"),
                "steps[0].branch.if.attribute.value",
            ),
            (
                "name: x\ntrigger: { text: { regex: '(' } }\nsteps: [{ id: a, stop: {} }]\n".into(),
                "trigger.text.regex",
            ),
            (
                "name: x\ntrigger: { postback: { exact: a, prefix: b } }\nsteps: [{ id: a, stop: {} }]\n".into(),
                "trigger.postback",
            ),
            ("name: x\ntrigger: { follow: {} }\nsteps: []\n".into(), "steps"),
            (
                "name: x\ntrigger: { follow: {} }\nsteps: [{ id: a, stop: {} }]\noptions: { reentry: twice }\n".into(),
                "options.reentry",
            ),
            ("name: x\ntrigger: { shout: {} }\nsteps: []\n".into(), "trigger.shout"),
            ("name: 'open\n".into(), "name"),
        ];
        for (yaml, path) in cases {
            let e = error(&yaml);
            assert_eq!(e.path, path, "{yaml}\n→ {e}");
        }
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(
            parse_duration("3d"),
            Some(std::time::Duration::from_secs(3 * 86_400))
        );
        assert_eq!(
            parse_duration("1h30m"),
            Some(std::time::Duration::from_secs(5_400))
        );
        assert_eq!(
            parse_duration("90s"),
            Some(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            parse_duration("2w"),
            Some(std::time::Duration::from_secs(14 * 86_400))
        );
        for bad in ["", "3", "3x", "d", "1h30"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod examples {
    /// Every example under `examples/` reads and passes the checks.
    #[test]
    fn the_examples_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let d =
                    super::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                super::check(&d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert_eq!(seen, 3, "the three examples");
    }
}
