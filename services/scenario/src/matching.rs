//! Which webhook events start a scenario: its trigger, compiled once per
//! version (a text regex is built once), matched against each event.
//!
//! - `follow`: a follow event; `kind` picks new friends (`isUnblocked`
//!   false), re-follows after a block (true), or both.
//! - `unfollow`: a block.
//! - `postback`: the data equals `exact`, starts with `prefix`, or, read as
//!   a query string (`action=join&campaign=spring`, percent-decoded), has
//!   `param.key` with `param.value`.
//! - `text`: a text message equal to `exact` (whitespace trimmed), containing
//!   `contains`, or matching `regex`; optionally without regard to case.
//! - `segment_entered` / `segment_exited`: a membership change of the
//!   contact (from contacts, after an event or a step) matches instead of
//!   an event; manual triggers only start through `StartRun`.
//!
//! A definition with `channel_id` matches only that channel's events.

use hibiki_proto::common::v1::InboundEvent;
use hibiki_proto::common::v1::inbound_event::Payload;
use hibiki_proto::common::v1::message_content::Content;
use hibiki_proto::scenario::v1::{
    FollowKind, ScenarioDefinition, postback_trigger, text_trigger, trigger,
};

use crate::definition::Invalid;

/// A scenario's trigger, ready to match events.
#[derive(Debug, Clone)]
pub struct Matcher {
    channel_id: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Follow(FollowKind),
    Unfollow,
    PostbackExact(String),
    PostbackPrefix(String),
    PostbackParam(String, String),
    Text(TextMatch, bool),
    /// A contact entered (true) or left (false) this segment.
    Segment(String, bool),
    /// Manual triggers: started by StartRun.
    Never,
}

#[derive(Debug, Clone)]
enum TextMatch {
    Exact(String),
    Contains(String),
    Regex(regex::Regex),
}

impl Matcher {
    /// The matcher of a (checked) definition.
    pub fn new(definition: &ScenarioDefinition) -> Result<Self, Invalid> {
        let kind = match definition.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(trigger::Kind::Follow(f)) => Kind::Follow(f.kind()),
            Some(trigger::Kind::Unfollow(_)) => Kind::Unfollow,
            Some(trigger::Kind::Postback(p)) => match &p.r#match {
                Some(postback_trigger::Match::Exact(e)) => Kind::PostbackExact(e.clone()),
                Some(postback_trigger::Match::Prefix(p)) => Kind::PostbackPrefix(p.clone()),
                Some(postback_trigger::Match::Param(kv)) => {
                    Kind::PostbackParam(kv.key.clone(), kv.value.clone())
                }
                None => Kind::Never,
            },
            Some(trigger::Kind::Text(t)) => {
                let fold = t.case_insensitive;
                let m = match &t.r#match {
                    Some(text_trigger::Match::Exact(e)) => {
                        TextMatch::Exact(fold_case(e.trim(), fold))
                    }
                    Some(text_trigger::Match::Contains(c)) => {
                        TextMatch::Contains(fold_case(c, fold))
                    }
                    Some(text_trigger::Match::Regex(r)) => TextMatch::Regex(
                        regex::RegexBuilder::new(r)
                            .case_insensitive(fold)
                            .size_limit(1 << 20)
                            .build()
                            .map_err(|e| Invalid {
                                path: "trigger.text.regex".into(),
                                message: format!("not a regular expression: {e}"),
                            })?,
                    ),
                    None => return Ok(Self::never(definition)),
                };
                Kind::Text(m, fold)
            }
            Some(trigger::Kind::SegmentEntered(t)) => Kind::Segment(t.segment_id.clone(), true),
            Some(trigger::Kind::SegmentExited(t)) => Kind::Segment(t.segment_id.clone(), false),
            _ => Kind::Never,
        };
        Ok(Self {
            channel_id: definition.channel_id.clone(),
            kind,
        })
    }

    fn never(definition: &ScenarioDefinition) -> Self {
        Self {
            channel_id: definition.channel_id.clone(),
            kind: Kind::Never,
        }
    }

    /// Whether a contact's entering (`entered`) or leaving `segment_id`
    /// starts the scenario.
    pub fn matches_membership(&self, segment_id: &str, entered: bool) -> bool {
        matches!(&self.kind, Kind::Segment(s, e) if s == segment_id && *e == entered)
    }

    /// The channel the scenario is bound to ("" for any).
    pub fn channel_id(&self) -> &str {
        &self.channel_id
    }

    /// Whether `event` starts the scenario.
    pub fn matches(&self, event: &InboundEvent) -> bool {
        if !self.channel_id.is_empty() && self.channel_id != event.channel_id {
            return false;
        }
        match (&self.kind, &event.payload) {
            (Kind::Follow(kind), Some(Payload::Follow(f))) => match kind {
                FollowKind::Any => true,
                FollowKind::New => !f.is_unblocked,
                FollowKind::Refollow => f.is_unblocked,
            },
            (Kind::Unfollow, Some(Payload::Unfollow(_))) => true,
            (Kind::PostbackExact(e), Some(Payload::Postback(p))) => p.data == *e,
            (Kind::PostbackPrefix(prefix), Some(Payload::Postback(p))) => {
                p.data.starts_with(prefix)
            }
            (Kind::PostbackParam(key, value), Some(Payload::Postback(p))) => {
                query_pairs(&p.data).any(|(k, v)| k == *key && v == *value)
            }
            (Kind::Text(m, fold), Some(Payload::Message(message))) => {
                let Some(Content::Text(t)) =
                    message.message.as_ref().and_then(|m| m.content.as_ref())
                else {
                    return false;
                };
                match m {
                    TextMatch::Exact(e) => fold_case(t.text.trim(), *fold) == *e,
                    TextMatch::Contains(c) => fold_case(&t.text, *fold).contains(c.as_str()),
                    TextMatch::Regex(r) => r.is_match(&t.text),
                }
            }
            _ => false,
        }
    }
}

fn fold_case(s: &str, fold: bool) -> String {
    if fold { s.to_lowercase() } else { s.to_owned() }
}

/// The pairs of a query string (`a=1&b=two%20words`), percent-decoded
/// (`+` is a space); a key without `=` has an empty value.
pub fn query_pairs(data: &str) -> impl Iterator<Item = (String, String)> + '_ {
    data.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k), decode(v))
    })
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use hibiki_proto::common::v1::{
        FollowEvent, MessageContent, MessageEvent, PostbackEvent, TextMessage, UnfollowEvent,
    };

    use super::*;
    use crate::definition::from_yaml;

    fn matcher(trigger: &str) -> Matcher {
        let yaml = format!("name: t\ntrigger: {trigger}\nsteps: [{{ id: a, stop: {{}} }}]\n");
        Matcher::new(&from_yaml(&yaml).unwrap()).unwrap()
    }

    fn event(payload: Payload) -> InboundEvent {
        InboundEvent {
            channel_id: "1000000001".into(),
            payload: Some(payload),
            ..Default::default()
        }
    }

    fn postback(data: &str) -> InboundEvent {
        event(Payload::Postback(PostbackEvent {
            data: data.into(),
            ..Default::default()
        }))
    }

    fn text(t: &str) -> InboundEvent {
        event(Payload::Message(MessageEvent {
            message: Some(MessageContent {
                content: Some(Content::Text(TextMessage {
                    text: t.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        }))
    }

    fn follow(unblocked: bool) -> InboundEvent {
        event(Payload::Follow(FollowEvent {
            is_unblocked: unblocked,
        }))
    }

    #[test]
    fn postbacks_match_exactly_by_prefix_or_by_a_query_parameter() {
        let m = matcher("{ postback: { param: { key: campaign, value: spring } } }");
        assert!(m.matches(&postback("action=join&campaign=spring")));
        assert!(m.matches(&postback("campaign=spring")));
        assert!(!m.matches(&postback("campaign=springtime")));
        assert!(!m.matches(&postback("xcampaign=spring")));
        assert!(!m.matches(&text("campaign=spring")));
        let m = matcher("{ postback: { param: { key: note, value: 'two words' } } }");
        assert!(m.matches(&postback("note=two%20words")));
        assert!(m.matches(&postback("note=two+words")));
        let m = matcher("{ postback: { exact: 'action=join' } }");
        assert!(m.matches(&postback("action=join")));
        assert!(!m.matches(&postback("action=join&x=1")));
        let m = matcher("{ postback: { prefix: 'action=' } }");
        assert!(m.matches(&postback("action=anything")));
        assert!(!m.matches(&postback("x&action=1")));
    }

    #[test]
    fn texts_match_exactly_by_substring_or_by_regex_with_or_without_case() {
        let m = matcher("{ text: { exact: Hours } }");
        assert!(m.matches(&text("  Hours ")));
        assert!(!m.matches(&text("hours")));
        let m = matcher("{ text: { exact: Hours, case_insensitive: true } }");
        assert!(m.matches(&text("HOURS")));
        let m = matcher("{ text: { contains: hours, case_insensitive: true } }");
        assert!(m.matches(&text("What are your HOURS?")));
        assert!(!m.matches(&text("what time do you open")));
        let m = matcher("{ text: { regex: '^coupon\\s+\\d{4}$' } }");
        assert!(m.matches(&text("coupon 2026")));
        assert!(!m.matches(&text("Coupon 2026")));
        assert!(!m.matches(&postback("coupon 2026")));
    }

    #[test]
    fn follows_match_new_friends_refollows_or_both() {
        let any = matcher("{ follow: {} }");
        let new = matcher("{ follow: { kind: new } }");
        let again = matcher("{ follow: { kind: refollow } }");
        assert!(any.matches(&follow(false)) && any.matches(&follow(true)));
        assert!(new.matches(&follow(false)) && !new.matches(&follow(true)));
        assert!(!again.matches(&follow(false)) && again.matches(&follow(true)));
        let unfollow = matcher("{ unfollow: {} }");
        assert!(unfollow.matches(&event(Payload::Unfollow(UnfollowEvent {}))));
        assert!(!unfollow.matches(&follow(false)));
        // Manual and segment triggers are never started by a webhook.
        assert!(!matcher("{ manual: {} }").matches(&follow(false)));
        let entered = matcher("{ segment_entered: { segment_id: s } }");
        assert!(!entered.matches(&follow(false)));
        assert!(entered.matches_membership("s", true));
        assert!(!entered.matches_membership("s", false));
        assert!(!entered.matches_membership("t", true));
        assert!(matcher("{ segment_exited: { segment_id: s } }").matches_membership("s", false));
    }

    #[test]
    fn a_channel_bound_scenario_matches_its_channel_only() {
        let yaml = "name: t\nchannel: '1000000002'\ntrigger: { follow: {} }\nsteps: [{ id: a, stop: {} }]\n";
        let m = Matcher::new(&from_yaml(yaml).unwrap()).unwrap();
        assert!(!m.matches(&follow(false)));
        let mut other = follow(false);
        other.channel_id = "1000000002".into();
        assert!(m.matches(&other));
    }

    #[test]
    fn query_strings_decode_percent_escapes() {
        let pairs: Vec<(String, String)> = query_pairs("a=1&b=x%26y&c&d=%zz&e=%41").collect();
        assert_eq!(
            pairs,
            [
                ("a".into(), "1".into()),
                ("b".into(), "x&y".into()),
                ("c".into(), "".into()),
                ("d".into(), "%zz".into()),
                ("e".into(), "A".into()),
            ]
        );
    }
}
