//! Scenario definitions through `ScenarioService`: applied as YAML or
//! protobuf, checked with the path of a bad field, versioned, listed,
//! enabled and disabled; against the real contacts and PostgreSQL.

use hibiki_proto::common::v1::PageRequest;
use hibiki_proto::contacts::v1::CreateTenantRequest;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_proto::scenario::v1::{
    ApplyRequest, DisableRequest, EnableRequest, GetScenarioRequest, ListScenariosRequest,
    ListVersionsRequest, ScenarioDefinition, apply_request,
};
use hibiki_runtime::Shutdown;
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, lifecycle, operator_token, service_env,
    wait_for_health,
};
use tonic_health::ServingStatus;

type Client = ScenarioServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        hibiki_runtime::grpc::ClientInterceptor,
    >,
>;

struct Mesh {
    _database: TestDatabase,
    url: String,
    stops: Vec<Shutdown>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for s in &self.stops {
            s.trigger();
        }
    }
}

async fn mesh() -> Mesh {
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    let (contacts, stop_contacts, _task) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    wait_for_health(&contacts, ServingStatus::Serving).await;
    TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts);
    let (url, stop, _task) = lifecycle::start::<hibiki_scenario::Application>(&env).await;
    wait_for_health(&url, ServingStatus::Serving).await;
    Mesh {
        _database: database,
        url,
        stops: vec![stop, stop_contacts],
    }
}

fn client(mesh: &Mesh) -> Client {
    ScenarioServiceClient::new(authorized(&mesh.url, SERVICE_TOKEN))
}

fn yaml(tenant: &str, text: &str) -> ApplyRequest {
    ApplyRequest {
        tenant_id: tenant.into(),
        source: Some(apply_request::Source::Yaml(text.into())),
        start_disabled: false,
    }
}

const SPRING: &str = include_str!("../../../examples/spring-campaign.yaml");

#[tokio::test]
async fn applying_versions_a_scenario_and_an_unchanged_definition_changes_nothing() {
    let mesh = mesh().await;
    let mut c = client(&mesh);
    let v1 = c.apply(yaml("acme", SPRING)).await.unwrap().into_inner();
    assert_eq!(v1.version, 1);
    assert!(v1.enabled);
    assert!(v1.scenario_id.starts_with("sc_"));
    assert_eq!(v1.source_yaml, SPRING);
    assert_eq!(v1.definition.as_ref().unwrap().name, "spring campaign");

    let same = c.apply(yaml("acme", SPRING)).await.unwrap().into_inner();
    assert_eq!(
        (same.scenario_id.as_str(), same.version),
        (v1.scenario_id.as_str(), 1)
    );

    let changed = SPRING.replace("Thanks for joining", "Welcome to");
    let v2 = c.apply(yaml("acme", &changed)).await.unwrap().into_inner();
    assert_eq!(
        (v2.scenario_id.as_str(), v2.version),
        (v1.scenario_id.as_str(), 2)
    );

    // The old version stays readable, for runs that started on it.
    let old = c
        .get_scenario(GetScenarioRequest {
            tenant_id: "acme".into(),
            scenario_id: v1.scenario_id.clone(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.definition, v1.definition);
    let current = c
        .get_scenario(GetScenarioRequest {
            tenant_id: "acme".into(),
            scenario_id: v1.scenario_id.clone(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.version, 2);
    let versions = c
        .list_versions(ListVersionsRequest {
            tenant_id: "acme".into(),
            scenario_id: v1.scenario_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [2, 1]
    );
    let missing = c
        .get_scenario(GetScenarioRequest {
            tenant_id: "acme".into(),
            scenario_id: v1.scenario_id.clone(),
            version: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Disable and enable.
    let off = c
        .disable(DisableRequest {
            tenant_id: "acme".into(),
            scenario_id: v1.scenario_id.clone(),
            stop_running: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!off.enabled);
    let on = c
        .enable(EnableRequest {
            tenant_id: "acme".into(),
            scenario_id: v1.scenario_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(on.enabled);
    // A protobuf definition is applied the same way, and may start disabled.
    let definition = ScenarioDefinition {
        name: "from protobuf".into(),
        ..on.definition.unwrap()
    };
    let proto = c
        .apply(ApplyRequest {
            tenant_id: "acme".into(),
            source: Some(apply_request::Source::Definition(definition)),
            start_disabled: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(proto.version, 1);
    assert!(!proto.enabled);
    assert_eq!(proto.source_yaml, "");
}

#[tokio::test]
async fn a_bad_definition_is_refused_with_the_path_of_the_bad_field() {
    let mesh = mesh().await;
    let mut c = client(&mesh);
    let bad = SPRING.replace(
        "switch_rich_menu: { alias: campaign }",
        "switch_rich_menu: {}",
    );
    let e = c.apply(yaml("acme", &bad)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("yaml: steps[1].switch_rich_menu:"),
        "{e:?}"
    );
    let bad = SPRING.replace("add_tags", "add_tag");
    let e = c.apply(yaml("acme", &bad)).await.unwrap_err();
    assert!(e.message().contains("steps[0]"), "{e:?}");
    // A protobuf definition passes the same checks.
    let e = c
        .apply(ApplyRequest {
            tenant_id: "acme".into(),
            source: Some(apply_request::Source::Definition(ScenarioDefinition {
                name: "no trigger".into(),
                ..Default::default()
            })),
            start_disabled: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("trigger:"), "{e:?}");
    // An unknown tenant, another tenant's operator.
    let e = c.apply(yaml("nobody", SPRING)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let mut globex = ScenarioServiceClient::new(authorized(&mesh.url, &operator_token("globex")));
    let e = globex.apply(yaml("acme", SPRING)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn scenarios_are_listed_by_name_a_page_at_a_time() {
    let mesh = mesh().await;
    let mut c = client(&mesh);
    for name in ["c", "a", "b"] {
        let text = SPRING.replace("name: spring campaign", &format!("name: {name}"));
        c.apply(yaml("acme", &text)).await.unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_scenarios(ListScenariosRequest {
                tenant_id: "acme".into(),
                page: Some(PageRequest {
                    page_size: 2,
                    page_token: token,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(
            page.scenarios
                .iter()
                .map(|s| s.definition.as_ref().unwrap().name.clone()),
        );
        token = page.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(names, ["a", "b", "c"]);
    let e = c
        .list_scenarios(ListScenariosRequest {
            tenant_id: "acme".into(),
            page: Some(PageRequest {
                page_size: 2,
                page_token: "zz".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}
