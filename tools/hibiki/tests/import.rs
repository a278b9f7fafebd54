//! `hibiki import` streams a CSV into a running contacts service, skips and
//! reports rows it cannot read or the service rejects, and prints a summary.

use hibiki_proto::common::v1::{ContactRef, value::Kind};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, GetContactRequest};
use hibiki_testkit::{SERVICE_TOKEN, TestDatabase, authorized, lifecycle, random_id, service_env};
use tokio::process::Command;

fn user(n: u32) -> String {
    format!("U{n:032x}")
}

#[tokio::test]
async fn import_streams_a_csv_and_reports_bad_lines() {
    let database = TestDatabase::create().await;
    let env = service_env(&database, None);
    let (url, shutdown, _task) = lifecycle::start::<hibiki_contacts::Application>(&env).await;
    hibiki_testkit::wait_for_health(&url, tonic_health::ServingStatus::Serving).await;
    TenantServiceClient::new(authorized(&url, SERVICE_TOKEN))
        .create_tenant(CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let csv = format!(
        "line_user_id,display_name,tags,age:number,vip:bool,signup:timestamp\n\
         {},Aiko,vip;spring,31,true,2026-04-01T09:00:00+09:00\n\
         {},Ben,,not-a-number,false,\n\
         {},\"Chie, Jr.\",spring,22,,\n\
         {},too,few\n\
         bad-user,Dai,,40,,\n\
         {},Emi,,,,\n",
        user(1),
        user(2),
        user(3),
        user(4),
        user(5),
    );
    let path = std::env::temp_dir().join(format!("hibiki-import-{}.csv", random_id()));
    std::fs::write(&path, csv).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_hibiki"))
        .args([
            "import",
            path.to_str().unwrap(),
            "--tenant",
            "acme",
            "--quiet",
        ])
        .args(["--contacts", &url, "--token", SERVICE_TOKEN])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "rejected rows exit 2\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("rows read      6"), "{stdout}");
    assert!(stdout.contains("imported       3"), "{stdout}");
    assert!(stdout.contains("rejected       3"), "{stdout}");
    assert!(
        stdout.contains("line 3 attributes.age: \"not-a-number\" is not a number"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 5: 3 cells, the header has 6"),
        "{stdout}"
    );
    assert!(stdout.contains("line 6 line_user_id:"), "{stdout}");

    let aiko = ContactServiceClient::new(authorized(&url, SERVICE_TOKEN))
        .get_contact(GetContactRequest {
            contact: Some(ContactRef {
                tenant_id: "acme".into(),
                line_user_id: user(1),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aiko.display_name, "Aiko");
    assert_eq!(aiko.tags, ["spring", "vip"]);
    assert_eq!(aiko.attributes["age"].kind, Some(Kind::NumberValue(31.0)));
    assert_eq!(aiko.attributes["vip"].kind, Some(Kind::BoolValue(true)));
    let Some(Kind::TimestampValue(signup)) = &aiko.attributes["signup"].kind else {
        panic!("signup is a timestamp: {aiko:?}");
    };
    assert_eq!(signup.seconds, 1_775_001_600);

    std::fs::remove_file(&path).unwrap();
    shutdown.trigger();
}
