//! The Messaging API client: one queued call → one HTTP request, and LINE's
//! answer → what delivery does next.

use std::time::Duration;

use hibiki_line::api::{Endpoint, QUOTA_EXHAUSTED, REQUEST_ID_HEADER, RETRY_KEY_HEADER};
use hibiki_proto::delivery::v1::{CallKind, QueuedCall};
use serde_json::value::RawValue;

/// LINE's answer to one call, or why none came.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status; 0 when no answer came (timeout, connection).
    pub status: u16,
    /// The body, or the transport error in words.
    pub body: String,
    /// `x-line-request-id`, when LINE answered.
    pub request_id: String,
}

/// What to do after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: LINE accepted the call.
    Accepted,
    /// 409 on the retry key: LINE had accepted it before; counts as sent.
    AlreadyAccepted,
    /// 429 for the rate limit: pause the channel's endpoint and retry
    /// without spending an attempt.
    RateLimited,
    /// 5xx, a timeout or no connection: retry with backoff.
    Retry,
    /// Any other 4xx (including 429 for the monthly quota): dead-letter at
    /// once, retrying cannot help.
    Dead,
}

impl Answer {
    /// What the answer means for the call.
    pub fn verdict(&self) -> Verdict {
        match self.status {
            200..=299 => Verdict::Accepted,
            409 => Verdict::AlreadyAccepted,
            429 if self.body.contains(QUOTA_EXHAUSTED) => Verdict::Dead,
            429 => Verdict::RateLimited,
            0 | 500..=599 => Verdict::Retry,
            _ => Verdict::Dead,
        }
    }
}

/// The endpoint a call goes to: bulk rich-menu endpoints for more than one
/// user.
pub fn endpoint_of(call: &QueuedCall) -> Endpoint {
    let users: usize = call.parts.iter().map(|p| p.user_ids.len()).sum();
    match call.kind() {
        CallKind::Push => Endpoint::Push,
        CallKind::Multicast => Endpoint::Multicast,
        CallKind::Reply => Endpoint::Reply,
        CallKind::LinkRichMenu if users > 1 => Endpoint::BulkLinkRichMenu,
        CallKind::LinkRichMenu => Endpoint::LinkRichMenu,
        CallKind::UnlinkRichMenu if users > 1 => Endpoint::BulkUnlinkRichMenu,
        CallKind::UnlinkRichMenu | CallKind::Unspecified => Endpoint::UnlinkRichMenu,
        // Not a LINE call itself; it makes multicasts.
        CallKind::ExpandSegment => Endpoint::Multicast,
    }
}

/// The Messaging API at a base URL (`https://api.line.me`, or line-sim).
#[derive(Clone)]
pub struct LineApi {
    http: reqwest::Client,
    base: String,
}

/// The messages of a call as one JSON array, from the stored JSON texts.
fn messages(call: &QueuedCall) -> Result<Vec<Box<RawValue>>, String> {
    call.messages_json
        .iter()
        .enumerate()
        .map(|(i, m)| {
            RawValue::from_string(m.clone()).map_err(|e| format!("messages_json[{i}]: {e}"))
        })
        .collect()
}

impl LineApi {
    /// A client for `base` (no trailing slash), giving up on a call after
    /// `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Makes `call` with the channel's `access_token`, carrying the trace's
    /// `traceparent`.
    pub async fn send(&self, call: &QueuedCall, access_token: &str) -> Answer {
        let users: Vec<&str> = call
            .parts
            .iter()
            .flat_map(|p| p.user_ids.iter().map(String::as_str))
            .collect();
        let endpoint = endpoint_of(call);
        let request = match self.request(call, endpoint, &users) {
            Ok(r) => r,
            Err(e) => {
                // A call that cannot even be written is LINE's 400.
                return Answer {
                    status: 400,
                    body: e,
                    request_id: String::new(),
                };
            }
        };
        let mut request = request.bearer_auth(access_token);
        if endpoint.takes_retry_key() && !call.retry_key.is_empty() {
            request = request.header(RETRY_KEY_HEADER, &call.retry_key);
        }
        if let Some(t) = call.trace.as_ref().filter(|t| !t.traceparent.is_empty()) {
            request = request.header("traceparent", &t.traceparent);
            if !t.tracestate.is_empty() {
                request = request.header("tracestate", &t.tracestate);
            }
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let request_id = response
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = response
                    .text()
                    .await
                    .unwrap_or_else(|e| format!("(body unreadable: {e})"));
                Answer {
                    status,
                    body,
                    request_id,
                }
            }
            Err(e) => Answer {
                status: 0,
                body: if e.is_timeout() {
                    "no answer from LINE in time".to_owned()
                } else {
                    format!("LINE unreachable: {e}")
                },
                request_id: String::new(),
            },
        }
    }

    /// The rich menu id an alias points to; `None` when LINE does not know
    /// the alias.
    pub async fn rich_menu_of_alias(
        &self,
        alias: &str,
        access_token: &str,
    ) -> Result<Option<String>, String> {
        let response = self
            .http
            .get(format!("{}/v2/bot/richmenu/alias/{alias}", self.base))
            .bearer_auth(access_token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match response.status().as_u16() {
            200 => {
                let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
                Ok(body["richMenuId"].as_str().map(str::to_owned))
            }
            400 | 404 => Ok(None),
            status => Err(format!("LINE answered {status} for alias {alias:?}")),
        }
    }

    fn request(
        &self,
        call: &QueuedCall,
        endpoint: Endpoint,
        users: &[&str],
    ) -> Result<reqwest::RequestBuilder, String> {
        let url = |path: &str| format!("{}{path}", self.base);
        let builder = match endpoint {
            Endpoint::Push => {
                let body = erased::Push {
                    to: users.first().copied().unwrap_or_default(),
                    messages: messages(call)?,
                    notification_disabled: call.notification_disabled,
                };
                self.http
                    .post(url("/v2/bot/message/push"))
                    .body(json(&body)?)
            }
            Endpoint::Multicast => {
                let body = erased::Multicast {
                    to: users,
                    messages: messages(call)?,
                    notification_disabled: call.notification_disabled,
                };
                self.http
                    .post(url("/v2/bot/message/multicast"))
                    .body(json(&body)?)
            }
            Endpoint::Reply => {
                let body = erased::Reply {
                    reply_token: &call.reply_token,
                    messages: messages(call)?,
                    notification_disabled: call.notification_disabled,
                };
                self.http
                    .post(url("/v2/bot/message/reply"))
                    .body(json(&body)?)
            }
            Endpoint::LinkRichMenu => self.http.post(url(&format!(
                "/v2/bot/user/{}/richmenu/{}",
                users.first().copied().unwrap_or_default(),
                call.rich_menu_id
            ))),
            Endpoint::BulkLinkRichMenu => {
                let body = erased::BulkLink {
                    rich_menu_id: &call.rich_menu_id,
                    user_ids: users,
                };
                self.http
                    .post(url("/v2/bot/richmenu/bulk/link"))
                    .body(json(&body)?)
            }
            Endpoint::UnlinkRichMenu => self.http.delete(url(&format!(
                "/v2/bot/user/{}/richmenu",
                users.first().copied().unwrap_or_default()
            ))),
            Endpoint::BulkUnlinkRichMenu => {
                let body = erased::BulkUnlink { user_ids: users };
                self.http
                    .post(url("/v2/bot/richmenu/bulk/unlink"))
                    .body(json(&body)?)
            }
            other => return Err(format!("delivery does not call {other}")),
        };
        Ok(builder.header("content-type", "application/json"))
    }
}

/// A request body as JSON text.
fn json<T: serde::Serialize>(body: &T) -> Result<String, String> {
    serde_json::to_string(body).map_err(|e| e.to_string())
}

/// LINE's request bodies.
mod erased {
    use serde::Serialize;
    use serde_json::value::RawValue;

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Push<'a> {
        pub to: &'a str,
        pub messages: Vec<Box<RawValue>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub notification_disabled: bool,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Multicast<'a> {
        pub to: &'a [&'a str],
        pub messages: Vec<Box<RawValue>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub notification_disabled: bool,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Reply<'a> {
        pub reply_token: &'a str,
        pub messages: Vec<Box<RawValue>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub notification_disabled: bool,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct BulkLink<'a> {
        pub rich_menu_id: &'a str,
        pub user_ids: &'a [&'a str],
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct BulkUnlink<'a> {
        pub user_ids: &'a [&'a str],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.into(),
            request_id: String::new(),
        }
    }

    #[test]
    fn answers_are_judged_as_line_md_says() {
        assert_eq!(answer(200, "{}").verdict(), Verdict::Accepted);
        assert_eq!(answer(202, "{}").verdict(), Verdict::Accepted);
        assert_eq!(answer(409, "").verdict(), Verdict::AlreadyAccepted);
        assert_eq!(
            answer(429, hibiki_line::api::RATE_LIMITED).verdict(),
            Verdict::RateLimited
        );
        assert_eq!(answer(429, QUOTA_EXHAUSTED).verdict(), Verdict::Dead);
        assert_eq!(answer(500, "").verdict(), Verdict::Retry);
        assert_eq!(answer(503, "").verdict(), Verdict::Retry);
        assert_eq!(answer(0, "timeout").verdict(), Verdict::Retry);
        assert_eq!(answer(400, "").verdict(), Verdict::Dead);
        assert_eq!(answer(401, "").verdict(), Verdict::Dead);
        assert_eq!(answer(403, "").verdict(), Verdict::Dead);
    }
}
