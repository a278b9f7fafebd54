//! LINE's webhook, as the gateway reads it: the signature check on the raw
//! body, and the envelope and its events turned into `InboundEvent`s.
//!
//! Every event keeps its exact JSON bytes in `raw`; the typed fields are
//! read from them. An event of a type hibiki does not model is accepted as
//! `UnknownEvent` (LINE adds types over time: that is never a reason to
//! fail a delivery). Fields LINE leaves out stay at their defaults.

use hibiki_proto::common::v1::inbound_event::Payload;
use hibiki_proto::common::v1::message_content::Content;
use hibiki_proto::common::v1::{
    AccountLinkEvent, ActivatedEvent, BeaconEvent, BotResumedEvent, BotSuspendedEvent,
    DeactivatedEvent, DeliveryEvent, EventMode, FileMessage, FollowEvent, InboundEvent, JoinEvent,
    LeaveEvent, LocationMessage, MediaMessage, MemberJoinedEvent, MemberLeftEvent, MembershipEvent,
    MessageContent, MessageEditedEvent, MessageEvent, ModuleEvent, PostbackEvent, Source,
    SourceType, StickerMessage, TextMessage, UnfollowEvent, UnknownEvent, UnsendEvent,
    VideoPlayCompleteEvent,
};
use std::borrow::Cow;

use serde_json::Value;
use serde_json::value::RawValue;

pub use hibiki_line::signature::{SIGNATURE_HEADER, sign, signature_is_valid};

/// Why a signed body is not a webhook.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    /// Not JSON, or not the envelope's shape.
    #[error("the body is not a LINE webhook: {0}")]
    Malformed(String),
    /// An event lacks what every event has.
    #[error("events[{index}]: {message}")]
    Event {
        /// The event's index in `events`.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    destination: String,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// A parsed webhook body.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// The bot's user id the webhook was sent to.
    pub destination: String,
    /// The events, in the order of the body; `tenant_id`, `channel_id`,
    /// `received_at` and `trace` are left for the caller.
    pub events: Vec<InboundEvent>,
}

/// Parses a webhook body (already verified).
pub fn parse(body: &[u8]) -> Result<Webhook, ParseError> {
    let envelope: Envelope<'_> =
        serde_json::from_slice(body).map_err(|e| ParseError::Malformed(e.to_string()))?;
    let events = envelope
        .events
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            parse_event(raw, &envelope.destination)
                .map_err(|message| ParseError::Event { index, message })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Webhook {
        destination: envelope.destination,
        events,
    })
}

fn str_at<'v>(v: &'v Value, path: &[&str]) -> &'v str {
    at(v, path).and_then(Value::as_str).unwrap_or("")
}

fn at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, key| v.get(key))
}

fn i64_at(v: &Value, path: &[&str]) -> i64 {
    at(v, path).and_then(Value::as_i64).unwrap_or(0)
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    at(v, path)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The non-empty `userId`s of the objects in the array at `path`, e.g.
/// `joined.members` or `mention.mentionees`.
fn user_ids_at(v: &Value, path: &[&str]) -> Vec<String> {
    at(v, path)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|m| str_at(m, &["userId"]).to_owned())
                .filter(|u| !u.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// What every event has, read straight from the event's JSON without a
/// tree of it (this runs for every webhook). The type's own object stays
/// raw, and only it is read into a tree.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    timestamp: i64,
    #[serde(borrow, default)]
    mode: Cow<'a, str>,
    #[serde(borrow, default)]
    webhook_event_id: Cow<'a, str>,
    #[serde(default)]
    delivery_context: DeliveryContext,
    #[serde(borrow, default)]
    source: Option<SourceJson<'a>>,
    #[serde(borrow, default)]
    reply_token: Cow<'a, str>,
    // Each type's own object, under the key LINE puts it.
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    unsend: Option<&'a RawValue>,
    #[serde(borrow, default)]
    follow: Option<&'a RawValue>,
    #[serde(borrow, default)]
    joined: Option<&'a RawValue>,
    #[serde(borrow, default)]
    left: Option<&'a RawValue>,
    #[serde(borrow, default)]
    postback: Option<&'a RawValue>,
    #[serde(borrow, default)]
    video_play_complete: Option<&'a RawValue>,
    #[serde(borrow, default)]
    beacon: Option<&'a RawValue>,
    #[serde(borrow, default)]
    link: Option<&'a RawValue>,
    #[serde(borrow, default)]
    membership: Option<&'a RawValue>,
    #[serde(borrow, default)]
    module: Option<&'a RawValue>,
    #[serde(borrow, default)]
    chat_control: Option<&'a RawValue>,
    #[serde(borrow, default)]
    delivery: Option<&'a RawValue>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeliveryContext {
    #[serde(default)]
    is_redelivery: bool,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceJson<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    user_id: Cow<'a, str>,
    #[serde(borrow, default)]
    group_id: Cow<'a, str>,
    #[serde(borrow, default)]
    room_id: Cow<'a, str>,
}

impl Head<'_> {
    /// The type's own object, as `{"<key>": {...}}` (empty when absent),
    /// for the readers below, which look it up by key.
    fn content(&self, kind: &str) -> Result<Value, String> {
        let (key, raw) = match kind {
            "message" | "messageEdited" => ("message", self.message),
            "unsend" => ("unsend", self.unsend),
            "follow" => ("follow", self.follow),
            "memberJoined" => ("joined", self.joined),
            "memberLeft" => ("left", self.left),
            "postback" => ("postback", self.postback),
            "videoPlayComplete" => ("videoPlayComplete", self.video_play_complete),
            "beacon" => ("beacon", self.beacon),
            "accountLink" => ("link", self.link),
            "membership" => ("membership", self.membership),
            "module" => ("module", self.module),
            "activated" => ("chatControl", self.chat_control),
            "delivery" => ("delivery", self.delivery),
            _ => return Ok(Value::Null),
        };
        let mut root = serde_json::Map::new();
        if let Some(raw) = raw {
            let inner: Value =
                serde_json::from_str(raw.get()).map_err(|e| format!("{key}: {e}"))?;
            root.insert(key.to_owned(), inner);
        }
        Ok(Value::Object(root))
    }
}

fn parse_event(raw: &RawValue, destination: &str) -> Result<InboundEvent, String> {
    if !raw.get().starts_with('{') {
        return Err("is not an object".into());
    }
    let head: Head<'_> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
    let kind = head.kind.as_deref().ok_or("has no type")?.to_owned();
    if head.webhook_event_id.is_empty() {
        return Err("has no webhookEventId".into());
    }
    let webhook_event_id = head.webhook_event_id.clone().into_owned();
    let source = head.source.as_ref().map(|s| Source {
        r#type: match s.kind.as_ref() {
            "user" => SourceType::User,
            "group" => SourceType::Group,
            "room" => SourceType::Room,
            _ => SourceType::Unspecified,
        } as i32,
        user_id: s.user_id.clone().into_owned(),
        group_id: s.group_id.clone().into_owned(),
        room_id: s.room_id.clone().into_owned(),
    });
    let v = head.content(&kind)?;
    let payload = match kind.as_str() {
        "message" => Payload::Message(MessageEvent {
            message: Some(message(&v)),
        }),
        "messageEdited" => Payload::MessageEdited(MessageEditedEvent {
            message: Some(message(&v)),
        }),
        "unsend" => Payload::Unsend(UnsendEvent {
            message_id: str_at(&v, &["unsend", "messageId"]).to_owned(),
        }),
        "follow" => Payload::Follow(FollowEvent {
            is_unblocked: at(&v, &["follow", "isUnblocked"])
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }),
        "unfollow" => Payload::Unfollow(UnfollowEvent {}),
        "join" => Payload::Join(JoinEvent {}),
        "leave" => Payload::Leave(LeaveEvent {}),
        "memberJoined" => Payload::MemberJoined(MemberJoinedEvent {
            user_ids: user_ids_at(&v, &["joined", "members"]),
        }),
        "memberLeft" => Payload::MemberLeft(MemberLeftEvent {
            user_ids: user_ids_at(&v, &["left", "members"]),
        }),
        "postback" => Payload::Postback(PostbackEvent {
            data: str_at(&v, &["postback", "data"]).to_owned(),
            params: at(&v, &["postback", "params"])
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .map(|(k, x)| {
                            let text = match x {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            (k.clone(), text)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }),
        "videoPlayComplete" => Payload::VideoPlayComplete(VideoPlayCompleteEvent {
            tracking_id: str_at(&v, &["videoPlayComplete", "trackingId"]).to_owned(),
        }),
        "beacon" => Payload::Beacon(BeaconEvent {
            hwid: str_at(&v, &["beacon", "hwid"]).to_owned(),
            r#type: str_at(&v, &["beacon", "type"]).to_owned(),
            dm: str_at(&v, &["beacon", "dm"]).to_owned(),
        }),
        "accountLink" => Payload::AccountLink(AccountLinkEvent {
            result: str_at(&v, &["link", "result"]).to_owned(),
            nonce: str_at(&v, &["link", "nonce"]).to_owned(),
        }),
        "membership" => Payload::Membership(MembershipEvent {
            r#type: str_at(&v, &["membership", "type"]).to_owned(),
            membership_id: i64_at(&v, &["membership", "membershipId"]),
        }),
        "module" => Payload::Module(ModuleEvent {
            r#type: str_at(&v, &["module", "type"]).to_owned(),
            bot_id: str_at(&v, &["module", "botId"]).to_owned(),
            scopes: strings_at(&v, &["module", "scopes"]),
            reason: str_at(&v, &["module", "reason"]).to_owned(),
        }),
        "activated" => Payload::Activated(ActivatedEvent {
            expire_at_ms: i64_at(&v, &["chatControl", "expireAt"]),
        }),
        "deactivated" => Payload::Deactivated(DeactivatedEvent {}),
        "botSuspended" => Payload::BotSuspended(BotSuspendedEvent {}),
        "botResumed" => Payload::BotResumed(BotResumedEvent {}),
        "delivery" => Payload::Delivery(DeliveryEvent {
            data: str_at(&v, &["delivery", "data"]).to_owned(),
        }),
        _ => Payload::Unknown(UnknownEvent {}),
    };
    Ok(InboundEvent {
        destination: destination.to_owned(),
        webhook_event_id,
        r#type: kind,
        timestamp_ms: head.timestamp,
        mode: match head.mode.as_ref() {
            "active" => EventMode::Active,
            "standby" => EventMode::Standby,
            _ => EventMode::Unspecified,
        } as i32,
        is_redelivery: head.delivery_context.is_redelivery,
        source,
        reply_token: head.reply_token.into_owned(),
        raw: raw.get().as_bytes().to_vec(),
        payload: Some(payload),
        ..Default::default()
    })
}

/// The `message` object of a message or messageEdited event.
fn message(v: &Value) -> MessageContent {
    let m = v.get("message").unwrap_or(&Value::Null);
    let kind = str_at(m, &["type"]);
    let media = || MediaMessage {
        content_provider: str_at(m, &["contentProvider", "type"]).to_owned(),
        original_content_url: str_at(m, &["contentProvider", "originalContentUrl"]).to_owned(),
        preview_image_url: str_at(m, &["contentProvider", "previewImageUrl"]).to_owned(),
        duration_ms: i64_at(m, &["duration"]),
        image_set_id: str_at(m, &["imageSet", "id"]).to_owned(),
        image_set_index: i64_at(m, &["imageSet", "index"]).max(0) as u32,
        image_set_total: i64_at(m, &["imageSet", "total"]).max(0) as u32,
    };
    let content = match kind {
        "text" => Some(Content::Text(TextMessage {
            text: str_at(m, &["text"]).to_owned(),
            quoted_message_id: str_at(m, &["quotedMessageId"]).to_owned(),
            mentioned_user_ids: user_ids_at(m, &["mention", "mentionees"]),
            mentions_all: at(m, &["mention", "mentionees"])
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| str_at(x, &["type"]) == "all")),
            emoji_product_ids: at(m, &["emojis"])
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| str_at(x, &["productId"]).to_owned())
                        .collect()
                })
                .unwrap_or_default(),
        })),
        "image" => Some(Content::Image(media())),
        "video" => Some(Content::Video(media())),
        "audio" => Some(Content::Audio(media())),
        "file" => Some(Content::File(FileMessage {
            file_name: str_at(m, &["fileName"]).to_owned(),
            file_size: i64_at(m, &["fileSize"]),
        })),
        "location" => Some(Content::Location(LocationMessage {
            title: str_at(m, &["title"]).to_owned(),
            address: str_at(m, &["address"]).to_owned(),
            latitude: at(m, &["latitude"]).and_then(Value::as_f64).unwrap_or(0.0),
            longitude: at(m, &["longitude"]).and_then(Value::as_f64).unwrap_or(0.0),
        })),
        "sticker" => Some(Content::Sticker(StickerMessage {
            package_id: str_at(m, &["packageId"]).to_owned(),
            sticker_id: str_at(m, &["stickerId"]).to_owned(),
            sticker_resource_type: str_at(m, &["stickerResourceType"]).to_owned(),
            keywords: strings_at(m, &["keywords"]),
            text: str_at(m, &["text"]).to_owned(),
            quoted_message_id: str_at(m, &["quotedMessageId"]).to_owned(),
        })),
        _ => None,
    };
    MessageContent {
        id: str_at(m, &["id"]).to_owned(),
        r#type: kind.to_owned(),
        quote_token: str_at(m, &["quoteToken"]).to_owned(),
        mark_as_read_token: str_at(m, &["markAsReadToken"]).to_owned(),
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/line/webhook-events.json"
    );

    #[test]
    fn a_signature_is_checked_on_the_raw_bytes() {
        let body = br#"{"destination":"U0","events":[]}"#;
        let good = sign(b"secret", body);
        assert!(signature_is_valid(b"secret", body, &good));
        assert!(!signature_is_valid(b"other", body, &good));
        assert!(!signature_is_valid(b"secret", b"{}", &good));
        assert!(!signature_is_valid(b"secret", body, "not base64!"));
        assert!(!signature_is_valid(b"secret", body, ""));
    }

    #[test]
    fn the_28_event_fixture_parses_every_event_with_its_type_and_user() {
        let body = std::fs::read(FIXTURE).expect("the shared fixture");
        let webhook = parse(&body).unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap();
        let events = json["events"].as_array().unwrap();
        assert_eq!(webhook.events.len(), 28);
        for (e, j) in webhook.events.iter().zip(events) {
            assert_eq!(e.r#type, j["type"].as_str().unwrap());
            assert_eq!(e.timestamp_ms, j["timestamp"].as_i64().unwrap());
            let user = j["source"]["userId"].as_str().unwrap_or("");
            assert_eq!(e.source.as_ref().map_or("", |s| s.user_id.as_str()), user);
            // `raw` is the event's own JSON, byte for byte equal in value.
            let raw: Value = serde_json::from_slice(&e.raw).unwrap();
            assert_eq!(&raw, j);
            let known = !matches!(e.payload, Some(Payload::Unknown(_)));
            assert_eq!(known, j["type"] != "undefined", "{}", j["type"]);
        }
        let texts: Vec<&str> = webhook
            .events
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Message(MessageEvent {
                    message:
                        Some(MessageContent {
                            content: Some(Content::Text(t)),
                            ..
                        }),
                })) => Some(t.text.as_str()),
                _ => None,
            })
            .collect();
        assert!(texts.contains(&"Hello, world"), "{texts:?}");
        let postback = webhook
            .events
            .iter()
            .find_map(|e| match &e.payload {
                Some(Payload::Postback(p)) => Some(p),
                _ => None,
            })
            .unwrap();
        assert_eq!(postback.data, "action=buyItem&itemId=123123&color=red");
        assert_eq!(postback.params["datetime"], "2017-12-25T01:00");
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        assert!(matches!(parse(b"not json"), Err(ParseError::Malformed(_))));
        assert!(matches!(parse(b"{}"), Err(ParseError::Malformed(_))));
        assert_eq!(
            parse(br#"{"destination":"U0","events":[{"type":"follow"}]}"#),
            Err(ParseError::Event {
                index: 0,
                message: "has no webhookEventId".into()
            })
        );
        let Err(ParseError::Event { index: 1, message }) = parse(
            br#"{"events":[{"type":"follow","webhookEventId":"a"},{"type":"follow","webhookEventId":"b","timestamp":"soon"}]}"#,
        ) else {
            panic!("a timestamp that is not a number is refused");
        };
        assert!(message.contains("invalid type"), "{message}");
        assert_eq!(
            parse(br#"{"events":[7]}"#),
            Err(ParseError::Event {
                index: 0,
                message: "is not an object".into()
            })
        );
        // A type's own object is read leniently (LINE adds to it): a field of
        // an unexpected shape reads as empty; only its JSON must be valid.
        let lenient = parse(
            br#"{"events":[{"type":"postback","webhookEventId":"a","postback":{"data":1}}]}"#,
        )
        .unwrap();
        assert!(matches!(
            &lenient.events[0].payload,
            Some(Payload::Postback(p)) if p.data.is_empty()
        ));
    }

    #[test]
    fn an_empty_event_list_is_a_webhook() {
        let empty = parse(br#"{"destination":"U0","events":[]}"#).unwrap();
        assert!(empty.events.is_empty());
    }
}
