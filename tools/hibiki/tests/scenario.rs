//! `hibiki scenario apply` applies a YAML file (and says where a bad one is
//! wrong); `list` and `versions` show what is stored.

mod common;

use common::hibiki;
use hibiki_proto::contacts::v1::CreateTenantRequest;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_testkit::{SERVICE_TOKEN, TestDatabase, authorized, lifecycle, random_id, service_env};
use tonic_health::ServingStatus;

#[tokio::test]
async fn scenario_apply_list_and_versions() {
    let database = TestDatabase::create().await;
    let mut env = service_env(&database, None);
    let (contacts, stop_contacts, _task) =
        lifecycle::start::<hibiki_contacts::Application>(&env).await;
    hibiki_testkit::wait_for_health(&contacts, ServingStatus::Serving).await;
    TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    env.insert("HIBIKI_CONTACTS_URL".into(), contacts);
    let (url, stop, _task) = lifecycle::start::<hibiki_scenario::Application>(&env).await;
    hibiki_testkit::wait_for_health(&url, ServingStatus::Serving).await;
    let common = ["--scenario", &url, "--token", SERVICE_TOKEN];
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/spring-campaign.yaml"
    );

    let (ok, out, err) = hibiki(
        &[
            &["scenario", "apply", "-f", example, "--tenant", "acme"][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("applied sc_"), "{out}");
    assert!(
        out.contains("v1  enabled   spring campaign  (trigger: postback)"),
        "{out}"
    );
    let id = out.split_whitespace().nth(1).unwrap().to_owned();

    // A changed file is version 2.
    let changed = std::env::temp_dir().join(format!("hibiki-scenario-{}.yaml", random_id()));
    std::fs::write(
        &changed,
        std::fs::read_to_string(example)
            .unwrap()
            .replace("Thanks for joining", "Welcome to"),
    )
    .unwrap();
    let (ok, out, _) = hibiki(
        &[
            &[
                "scenario",
                "apply",
                "-f",
                changed.to_str().unwrap(),
                "--tenant",
                "acme",
            ][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(ok);
    assert!(out.contains(&format!("{id}  v2")), "{out}");
    let (ok, out, _) = hibiki(
        &[
            &["scenario", "versions", "--tenant", "acme", &id][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(ok);
    let versions: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(versions, ["v2", "v1"]);
    let (ok, out, _) =
        hibiki(&[&["scenario", "list", "--tenant", "acme"][..], &common].concat()).await;
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (ok, out, _) = hibiki(
        &[
            &["scenario", "disable", "--tenant", "acme", &id][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(ok);
    assert!(out.contains("disabled"), "{out}");

    // A dry run of a tap: the steps it would take, nothing done.
    let (ok, _, _) = hibiki(
        &[
            &["scenario", "enable", "--tenant", "acme", &id][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(ok);
    let (ok, out, err) = hibiki(
        &[
            &[
                "scenario",
                "dry-run",
                "--tenant",
                "acme",
                "--user",
                &format!("U{:032x}", 5),
                "--postback",
                "action=join&campaign=spring",
            ][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("would start {id} (v2):")), "{out}");
    assert!(out.contains("  tag: add tags campaign:spring"), "{out}");
    assert!(
        out.contains("  thanks: send 1 message(s) as a reply"),
        "{out}"
    );

    // A bad file: the path of the bad field, exit 1.
    let bad = std::env::temp_dir().join(format!("hibiki-scenario-{}.yaml", random_id()));
    std::fs::write(
        &bad,
        "name: bad\ntrigger: { follow: {} }\nsteps:\n  - { id: w, wait: { duration: soon } }\n",
    )
    .unwrap();
    let (ok, _, err) = hibiki(
        &[
            &[
                "scenario",
                "apply",
                "-f",
                bad.to_str().unwrap(),
                "--tenant",
                "acme",
            ][..],
            &common,
        ]
        .concat(),
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("steps[0].wait.duration"),
        "{err}"
    );

    stop.trigger();
    stop_contacts.trigger();
}
