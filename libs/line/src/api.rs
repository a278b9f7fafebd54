//! The Messaging API: its endpoints, their rate limits, its error body, and
//! the checks LINE makes on ids and message objects.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The most message objects one request carries.
pub const MAX_MESSAGES: usize = 5;
/// The most user ids one multicast or bulk rich-menu request carries.
pub const MAX_RECIPIENTS: usize = 500;
/// The header carrying a retry key (a UUID) on the endpoints that take one.
pub const RETRY_KEY_HEADER: &str = "x-line-retry-key";
/// The header LINE puts on every response.
pub const REQUEST_ID_HEADER: &str = "x-line-request-id";
/// On a 409 for a repeated retry key: the request id of the accepted one.
pub const ACCEPTED_REQUEST_ID_HEADER: &str = "x-line-accepted-request-id";
/// How long LINE remembers a retry key, from its first attempt.
pub const RETRY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
/// LINE's 429 message when a rate limit is exceeded.
pub const RATE_LIMITED: &str = "The API rate limit has been exceeded. Try again later.";
/// LINE's 429 message when the monthly message quota is used up.
pub const QUOTA_EXHAUSTED: &str = "You have reached your monthly limit.";

/// A Messaging API endpoint hibiki calls (and line-sim serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v2/bot/message/reply`
    Reply,
    /// `POST /v2/bot/message/push`
    Push,
    /// `POST /v2/bot/message/multicast`
    Multicast,
    /// `POST /v2/bot/message/narrowcast`
    Narrowcast,
    /// `GET /v2/bot/message/progress/narrowcast`
    NarrowcastProgress,
    /// `POST /v2/bot/message/broadcast`
    Broadcast,
    /// `POST /v2/bot/user/{userId}/richmenu/{richMenuId}`
    LinkRichMenu,
    /// `DELETE /v2/bot/user/{userId}/richmenu`
    UnlinkRichMenu,
    /// `POST /v2/bot/richmenu/bulk/link`
    BulkLinkRichMenu,
    /// `POST /v2/bot/richmenu/bulk/unlink`
    BulkUnlinkRichMenu,
    /// `POST /v2/bot/richmenu`
    CreateRichMenu,
    /// `GET /v2/bot/richmenu/list`
    ListRichMenus,
    /// `POST /v2/bot/richmenu/alias`
    CreateRichMenuAlias,
    /// `GET /v2/bot/richmenu/alias/{richMenuAliasId}`
    GetRichMenuAlias,
    /// `GET /v2/bot/richmenu/alias/list`
    ListRichMenuAliases,
    /// `DELETE /v2/bot/richmenu/alias/{richMenuAliasId}`
    DeleteRichMenuAlias,
    /// `GET /v2/bot/profile/{userId}`
    Profile,
    /// `GET /v2/bot/message/quota`
    Quota,
    /// `GET /v2/bot/message/quota/consumption`
    QuotaConsumption,
}

/// A rate limit: at most `requests` per `per`, per channel and endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// Requests allowed in each `per`.
    pub requests: u32,
    /// The window, in milliseconds.
    #[serde(rename = "per_ms", with = "millis")]
    pub per: Duration,
}

impl Limit {
    /// `requests` a second.
    pub const fn per_second(requests: u32) -> Self {
        Self {
            requests,
            per: Duration::from_secs(1),
        }
    }

    /// `requests` an hour.
    pub const fn per_hour(requests: u32) -> Self {
        Self {
            requests,
            per: Duration::from_secs(3600),
        }
    }

    /// The steady rate, in requests a second.
    pub fn rate(&self) -> f64 {
        f64::from(self.requests) / self.per.as_secs_f64()
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: &'static [Endpoint] = &[
        Endpoint::Reply,
        Endpoint::Push,
        Endpoint::Multicast,
        Endpoint::Narrowcast,
        Endpoint::NarrowcastProgress,
        Endpoint::Broadcast,
        Endpoint::LinkRichMenu,
        Endpoint::UnlinkRichMenu,
        Endpoint::BulkLinkRichMenu,
        Endpoint::BulkUnlinkRichMenu,
        Endpoint::CreateRichMenu,
        Endpoint::ListRichMenus,
        Endpoint::CreateRichMenuAlias,
        Endpoint::GetRichMenuAlias,
        Endpoint::ListRichMenuAliases,
        Endpoint::DeleteRichMenuAlias,
        Endpoint::Profile,
        Endpoint::Quota,
        Endpoint::QuotaConsumption,
    ];

    /// The snake_case name used in configuration, metrics and ledgers.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Reply => "reply",
            Endpoint::Push => "push",
            Endpoint::Multicast => "multicast",
            Endpoint::Narrowcast => "narrowcast",
            Endpoint::NarrowcastProgress => "narrowcast_progress",
            Endpoint::Broadcast => "broadcast",
            Endpoint::LinkRichMenu => "link_rich_menu",
            Endpoint::UnlinkRichMenu => "unlink_rich_menu",
            Endpoint::BulkLinkRichMenu => "bulk_link_rich_menu",
            Endpoint::BulkUnlinkRichMenu => "bulk_unlink_rich_menu",
            Endpoint::CreateRichMenu => "create_rich_menu",
            Endpoint::ListRichMenus => "list_rich_menus",
            Endpoint::CreateRichMenuAlias => "create_rich_menu_alias",
            Endpoint::GetRichMenuAlias => "get_rich_menu_alias",
            Endpoint::ListRichMenuAliases => "list_rich_menu_aliases",
            Endpoint::DeleteRichMenuAlias => "delete_rich_menu_alias",
            Endpoint::Profile => "profile",
            Endpoint::Quota => "quota",
            Endpoint::QuotaConsumption => "quota_consumption",
        }
    }

    /// The endpoint named `name` (see [`Endpoint::name`]).
    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// Whether LINE takes `X-Line-Retry-Key` here (elsewhere it answers 400
    /// to it).
    pub fn takes_retry_key(self) -> bool {
        matches!(
            self,
            Endpoint::Push | Endpoint::Multicast | Endpoint::Narrowcast | Endpoint::Broadcast
        )
    }

    /// LINE's published rate limit, per channel. Endpoints LINE gives no
    /// figure of their own fall under its general 2,000 requests a second.
    pub fn default_limit(self) -> Limit {
        match self {
            Endpoint::Multicast => Limit::per_second(200),
            Endpoint::Narrowcast | Endpoint::Broadcast => Limit::per_hour(60),
            _ => Limit::per_second(2_000),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads a limit setting, `ENDPOINT=N/s` or `ENDPOINT=N/h` (e.g.
/// `push=2000/s`).
pub fn parse_limit(setting: &str) -> Result<(Endpoint, Limit), String> {
    let (name, rate) = setting
        .split_once('=')
        .ok_or_else(|| format!("{setting:?}: expected ENDPOINT=N/s or ENDPOINT=N/h"))?;
    let endpoint = Endpoint::from_name(name.trim()).ok_or_else(|| {
        let names: Vec<&str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        format!("{name}: not an endpoint ({})", names.join(", "))
    })?;
    let (n, unit) = rate
        .split_once('/')
        .ok_or_else(|| format!("{setting:?}: expected N/s or N/h"))?;
    let n: u32 = n
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{setting:?}: N must be a positive whole number"))?;
    let limit = match unit.trim() {
        "s" => Limit::per_second(n),
        "h" => Limit::per_hour(n),
        _ => return Err(format!("{setting:?}: the unit is s or h")),
    };
    Ok((endpoint, limit))
}

/// LINE's error body: `{"message": ..., "details": [{"message", "property"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub message: String,
    /// One entry per bad property; left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
    /// On a 409 for a repeated retry key: the messages the accepted request
    /// sent.
    #[serde(
        default,
        rename = "sentMessages",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub sent_messages: Vec<Value>,
}

impl ErrorBody {
    /// A body with a message alone.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            details: Vec::new(),
            sent_messages: Vec::new(),
        }
    }

    /// The body for a request with these bad properties.
    pub fn invalid(details: Vec<ErrorDetail>) -> Self {
        Self {
            message: format!("The request body has {} error(s)", details.len()),
            details,
            sent_messages: Vec::new(),
        }
    }
}

/// One bad property of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What is wrong with it.
    pub message: String,
    /// Where it is, e.g. `messages[0].text`.
    pub property: String,
}

impl ErrorDetail {
    /// `property` is wrong because `message`.
    pub fn new(property: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            property: property.into(),
        }
    }
}

/// Whether `id` has the shape of a LINE id with `prefix` (`U` user, `C`
/// group, `R` room): the letter and 32 lowercase hex digits.
fn is_id(id: &str, prefix: u8) -> bool {
    id.len() == 33
        && id.as_bytes()[0] == prefix
        && id[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `id` is a LINE user id (`U` and 32 hex digits).
pub fn is_user_id(id: &str) -> bool {
    is_id(id, b'U')
}

/// Whether `id` can be pushed to: a user, group (`C…`) or room (`R…`) id.
pub fn is_push_target(id: &str) -> bool {
    is_id(id, b'U') || is_id(id, b'C') || is_id(id, b'R')
}

/// Whether `key` is a retry key LINE takes: a UUID in its hex form.
pub fn is_retry_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The message types LINE sends, with the properties each requires.
const MESSAGE_TYPES: &[(&str, &[&str])] = &[
    ("text", &["text"]),
    ("textV2", &["text"]),
    ("sticker", &["packageId", "stickerId"]),
    ("image", &["originalContentUrl", "previewImageUrl"]),
    ("video", &["originalContentUrl", "previewImageUrl"]),
    ("audio", &["originalContentUrl", "duration"]),
    ("location", &["title", "address", "latitude", "longitude"]),
    ("imagemap", &["baseUrl", "altText", "baseSize", "actions"]),
    ("template", &["altText", "template"]),
    ("flex", &["altText", "contents"]),
];

/// The longest text message, in characters.
pub const MAX_TEXT_CHARS: usize = 5_000;

/// Checks `messages` (the request's `messages` property) as LINE does: an
/// array of 1 to 5 message objects, each of a known type with the
/// properties that type requires. Returns one detail per problem, named
/// like `messages[2].text`.
pub fn check_messages(messages: Option<&Value>) -> Vec<ErrorDetail> {
    let mut details = Vec::new();
    let Some(messages) = messages else {
        details.push(ErrorDetail::new("messages", "Must not be null"));
        return details;
    };
    let Some(list) = messages.as_array() else {
        details.push(ErrorDetail::new("messages", "Must be an array"));
        return details;
    };
    if list.is_empty() || list.len() > MAX_MESSAGES {
        details.push(ErrorDetail::new(
            "messages",
            format!("Size must be between 1 and {MAX_MESSAGES}"),
        ));
    }
    for (i, message) in list.iter().enumerate() {
        details.extend(check_message(&format!("messages[{i}]"), message));
    }
    details
}

/// Checks one message object at `at`.
pub fn check_message(at: &str, message: &Value) -> Vec<ErrorDetail> {
    let Some(object) = message.as_object() else {
        return vec![ErrorDetail::new(at, "Must be an object")];
    };
    let Some(kind) = object.get("type").and_then(Value::as_str) else {
        return vec![ErrorDetail::new(format!("{at}.type"), "Must not be null")];
    };
    let Some((_, required)) = MESSAGE_TYPES.iter().find(|(t, _)| *t == kind) else {
        let known: Vec<&str> = MESSAGE_TYPES.iter().map(|(t, _)| *t).collect();
        return vec![ErrorDetail::new(
            format!("{at}.type"),
            format!(
                "Must be one of the following values: [{}]",
                known.join(", ")
            ),
        )];
    };
    let mut details: Vec<ErrorDetail> = required
        .iter()
        .filter(|p| object.get(**p).is_none_or(Value::is_null))
        .map(|p| ErrorDetail::new(format!("{at}.{p}"), "Must not be null"))
        .collect();
    if let Some(text) = object.get("text") {
        match text.as_str() {
            Some(t) if t.is_empty() || t.chars().count() > MAX_TEXT_CHARS => {
                details.push(ErrorDetail::new(
                    format!("{at}.text"),
                    format!("Length must be between 1 and {MAX_TEXT_CHARS}"),
                ));
            }
            Some(_) => {}
            None => details.push(ErrorDetail::new(format!("{at}.text"), "Must be a string")),
        }
    }
    details
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn ids_and_retry_keys_have_lines_shapes() {
        assert!(is_user_id("U4af4980629f0a4ef8e8fbdc0d2a4d3ec"));
        assert!(!is_user_id("U4af4980629f0a4ef8e8fbdc0d2a4d3e"));
        assert!(!is_user_id("C4af4980629f0a4ef8e8fbdc0d2a4d3ec"));
        assert!(!is_user_id("U4AF4980629F0A4EF8E8FBDC0D2A4D3EC"));
        assert!(is_push_target("C4af4980629f0a4ef8e8fbdc0d2a4d3ec"));
        assert!(is_retry_key("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_retry_key("123e4567e89b12d3a456426614174000"));
        assert!(!is_retry_key("123e4567-e89b-12d3-a456-42661417400g"));
    }

    #[test]
    fn messages_are_checked_as_line_checks_them() {
        assert!(check_messages(Some(&json!([{"type": "text", "text": "hi"}]))).is_empty());
        assert_eq!(
            check_messages(None),
            vec![ErrorDetail::new("messages", "Must not be null")]
        );
        let six = json!([{"type":"text","text":"a"},{"type":"text","text":"a"},{"type":"text","text":"a"},
            {"type":"text","text":"a"},{"type":"text","text":"a"},{"type":"text","text":"a"}]);
        assert_eq!(check_messages(Some(&six))[0].property, "messages");
        let bad = json!([{"type": "text", "text": ""}, {"type": "sticker", "packageId": "1"}, {"type": "fax"}, 3]);
        let props: Vec<String> = check_messages(Some(&bad))
            .into_iter()
            .map(|d| d.property)
            .collect();
        assert_eq!(
            props,
            [
                "messages[0].text",
                "messages[1].stickerId",
                "messages[2].type",
                "messages[3]"
            ]
        );
    }

    #[test]
    fn endpoints_carry_lines_limits_and_retry_key_rules() {
        assert_eq!(Endpoint::Push.default_limit(), Limit::per_second(2_000));
        assert_eq!(Endpoint::Multicast.default_limit(), Limit::per_second(200));
        assert_eq!(Endpoint::Broadcast.default_limit(), Limit::per_hour(60));
        assert!(Endpoint::Push.takes_retry_key());
        assert!(!Endpoint::Reply.takes_retry_key());
        assert!(!Endpoint::BulkLinkRichMenu.takes_retry_key());
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_name(e.name()), Some(*e));
        }
        assert_eq!(
            parse_limit("push=500/s"),
            Ok((Endpoint::Push, Limit::per_second(500)))
        );
        assert_eq!(
            parse_limit("broadcast=60/h"),
            Ok((Endpoint::Broadcast, Limit::per_hour(60)))
        );
        for bad in ["push", "push=0/s", "push=5/m", "fax=5/s", "push=x/s"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }
}
