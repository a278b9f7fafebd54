//! Tenants and channels over real gRPC against the real PostgreSQL: who may
//! do what, precise errors, write-only credentials, and the WatchChannels
//! stream (full state, then every change).

use std::time::Duration;

use hibiki_proto::common::v1::PageRequest;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{
    ChannelRegistryEvent, CreateTenantRequest, DeleteChannelRequest, GetChannelRequest,
    GetTenantRequest, ListChannelsRequest, ListTenantsRequest, PutChannelRequest,
    UpdateTenantRequest, WatchChannelsRequest, channel_registry_event::Event,
};
use tonic::Code;
use tonic::codec::Streaming;

mod common;

use common::{Authorized, Contacts};

type Client = TenantServiceClient<Authorized>;

async fn create_tenant(client: &mut Client, tenant_id: &str) {
    client
        .create_tenant(CreateTenantRequest {
            tenant_id: tenant_id.into(),
            display_name: format!("{tenant_id} Inc."),
            time_zone: String::new(),
        })
        .await
        .expect("the tenant is created");
}

fn channel(tenant: &str, channel_id: &str, secret: &str) -> PutChannelRequest {
    PutChannelRequest {
        tenant_id: tenant.into(),
        channel_id: channel_id.into(),
        display_name: String::new(),
        bot_user_id: String::new(),
        channel_secret: secret.into(),
        access_token: format!("token-of-{channel_id}"),
    }
}

#[tokio::test]
async fn a_tenant_is_created_with_defaults_and_read_back() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    let created = client
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            display_name: String::new(),
            time_zone: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.display_name, "acme");
    assert_eq!(created.time_zone, "Asia/Tokyo");

    let read = client
        .get_tenant(GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, created);
}

#[tokio::test]
async fn creating_a_tenant_twice_is_already_exists() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    create_tenant(&mut client, "acme").await;
    let err = client
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
}

#[tokio::test]
async fn invalid_tenant_fields_are_rejected_by_name() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    let cases = [
        ("Bad_Id", "", "tenant_id"),
        ("acme", "Mars/Olympus_Mons", "time_zone"),
    ];
    for (tenant_id, time_zone, field) in cases {
        let err = client
            .create_tenant(CreateTenantRequest {
                tenant_id: tenant_id.into(),
                display_name: String::new(),
                time_zone: time_zone.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().starts_with(&format!("{field}: ")), "{err}");
    }
}

#[tokio::test]
async fn operators_cannot_create_tenants_nor_touch_other_tenants() {
    let contacts = Contacts::start().await;
    create_tenant(&mut contacts.tenants(), "acme").await;
    create_tenant(&mut contacts.tenants(), "globex").await;
    let mut acme = contacts.tenants_as("acme");

    let err = acme
        .create_tenant(CreateTenantRequest {
            tenant_id: "initech".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let err = acme
        .get_tenant(GetTenantRequest {
            tenant_id: "globex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let err = acme
        .put_channel(channel("globex", "2000000001", "s3cret"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // Its own tenant is fine, and it lists only itself.
    let updated = acme
        .update_tenant(UpdateTenantRequest {
            tenant_id: "acme".into(),
            display_name: "ACME".into(),
            time_zone: "Europe/Paris".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (updated.display_name.as_str(), updated.time_zone.as_str()),
        ("ACME", "Europe/Paris")
    );
    let listed = acme
        .list_tenants(ListTenantsRequest { page: None })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed
        .tenants
        .iter()
        .map(|t| t.tenant_id.as_str())
        .collect();
    assert_eq!(ids, ["acme"]);
}

#[tokio::test]
async fn tenants_are_listed_in_pages() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    for id in ["t1", "t2", "t3", "t4", "t5"] {
        create_tenant(&mut client, id).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_tenants(ListTenantsRequest {
                page: Some(PageRequest {
                    page_size: 2,
                    page_token: token.clone(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.tenants.into_iter().map(|t| t.tenant_id));
        token = page.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, ["t1", "t2", "t3", "t4", "t5"]);

    let err = client
        .list_tenants(ListTenantsRequest {
            page: Some(PageRequest {
                page_size: 2,
                page_token: "garbage".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn channel_credentials_are_write_only() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    create_tenant(&mut client, "acme").await;
    let stored = client
        .put_channel(channel("acme", "2000000001", "the-channel-secret"))
        .await
        .unwrap()
        .into_inner();
    assert!(stored.has_secret && stored.has_access_token);

    let read = client
        .get_channel(GetChannelRequest {
            tenant_id: "acme".into(),
            channel_id: "2000000001".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let listed = client
        .list_channels(ListChannelsRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for shown in [
        format!("{stored:?}"),
        format!("{read:?}"),
        format!("{listed:?}"),
    ] {
        assert!(!shown.contains("the-channel-secret"), "{shown}");
        assert!(!shown.contains("token-of-2000000001"), "{shown}");
    }
}

#[tokio::test]
async fn channel_errors_are_precise() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    create_tenant(&mut client, "acme").await;
    create_tenant(&mut client, "globex").await;

    let err = client
        .put_channel(channel("acme", "2000000001", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("channel_secret: "), "{err}");

    let err = client
        .put_channel(channel("acme", "not-digits", "s"))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("channel_id: "), "{err}");

    let err = client
        .put_channel(channel("nobody", "2000000001", "s"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    client
        .put_channel(channel("acme", "2000000001", "s"))
        .await
        .unwrap();
    let err = client
        .put_channel(channel("globex", "2000000001", "s"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");

    let delete = DeleteChannelRequest {
        tenant_id: "acme".into(),
        channel_id: "2000000001".into(),
    };
    client.delete_channel(delete.clone()).await.unwrap();
    let err = client.delete_channel(delete).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

async fn next(stream: &mut Streaming<ChannelRegistryEvent>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a registry event within 5 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
        .event
        .expect("an event")
}

/// The next event that is not a re-sent upsert of an unchanged channel.
async fn next_change(
    stream: &mut Streaming<ChannelRegistryEvent>,
    seen: &mut std::collections::HashMap<String, i64>,
) -> Event {
    loop {
        let event = next(stream).await;
        if let Event::Upsert(c) = &event {
            if seen.get(&c.channel_id) == Some(&c.revision) {
                continue;
            }
            seen.insert(c.channel_id.clone(), c.revision);
        }
        return event;
    }
}

#[tokio::test]
async fn watch_channels_sends_the_registry_then_every_change() {
    let contacts = Contacts::start().await;
    let mut client = contacts.tenants();
    create_tenant(&mut client, "acme").await;
    create_tenant(&mut client, "globex").await;
    client
        .put_channel(channel("acme", "2000000001", "secret-1"))
        .await
        .unwrap();
    client
        .put_channel(channel("globex", "2000000002", "secret-2"))
        .await
        .unwrap();

    let err = contacts
        .tenants_as("acme")
        .watch_channels(WatchChannelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let mut stream = client
        .watch_channels(WatchChannelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashMap::new();
    let mut initial = Vec::new();
    loop {
        match next(&mut stream).await {
            Event::Upsert(c) => {
                seen.insert(c.channel_id.clone(), c.revision);
                initial.push((c.tenant_id, c.channel_id, c.channel_secret));
            }
            Event::Synced(s) => {
                assert_eq!(s.channel_count, 2);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        initial,
        [
            (
                "acme".to_owned(),
                "2000000001".to_owned(),
                "secret-1".to_owned()
            ),
            (
                "globex".to_owned(),
                "2000000002".to_owned(),
                "secret-2".to_owned()
            ),
        ]
    );

    // A new channel, a rotated secret, a deletion: each arrives in order.
    client
        .put_channel(channel("acme", "2000000003", "secret-3"))
        .await
        .unwrap();
    let Event::Upsert(c) = next_change(&mut stream, &mut seen).await else {
        panic!("expected an upsert")
    };
    assert_eq!(
        (c.channel_id.as_str(), c.channel_secret.as_str()),
        ("2000000003", "secret-3")
    );

    client
        .put_channel(channel("acme", "2000000001", "rotated"))
        .await
        .unwrap();
    let Event::Upsert(c) = next_change(&mut stream, &mut seen).await else {
        panic!("expected an upsert")
    };
    assert_eq!(
        (c.channel_id.as_str(), c.channel_secret.as_str()),
        ("2000000001", "rotated")
    );

    client
        .delete_channel(DeleteChannelRequest {
            tenant_id: "globex".into(),
            channel_id: "2000000002".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut stream, &mut seen).await,
        Event::RemovedChannelId("2000000002".into())
    );
}

#[tokio::test]
async fn a_watch_stream_ends_with_unavailable_when_contacts_shuts_down() {
    let contacts = Contacts::start().await;
    let mut stream = contacts
        .tenants()
        .watch_channels(WatchChannelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next(&mut stream).await, Event::Synced(_)));
    contacts.shutdown.trigger();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("the stream ends promptly on shutdown");
    assert_eq!(end, Some(Code::Unavailable));
}
