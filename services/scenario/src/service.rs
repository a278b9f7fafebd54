//! `ScenarioService`: definitions in (checked, versioned), definitions out;
//! runs of a contact or a scenario; manual starts; dry runs.

use hibiki_proto::contacts::v1::GetTenantRequest;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::scenario::v1::scenario_service_server::ScenarioService;
use hibiki_proto::scenario::v1::{
    ApplyRequest, DisableRequest, DryRunRequest, DryRunResponse, EnableRequest, Funnel, FunnelStep,
    GetFunnelRequest, GetRunRequest, GetScenarioRequest, ListRunsRequest, ListRunsResponse,
    ListScenariosRequest, ListScenariosResponse, ListVersionsRequest, ListVersionsResponse, Run,
    Scenario, StartRunRequest, StartRunResponse, apply_request,
};
use hibiki_runtime::Caller;
use hibiki_runtime::error::ServiceError;
use hibiki_runtime::grpc::ClientInterceptor;
use tonic::{Request, Response, Status};

use crate::definition;
use crate::program::Program;
use crate::runs::Runs;
use crate::store::Scenarios;

/// contacts' tenant service, called with scenario's service token.
pub type Tenants = TenantServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>,
>;

/// The gRPC service.
pub struct ScenarioApi {
    scenarios: Scenarios,
    runs: Runs,
    tenants: Tenants,
    peers: crate::executor::Peers,
}

impl ScenarioApi {
    pub fn new(scenarios: Scenarios, runs: Runs, peers: crate::executor::Peers) -> Self {
        Self {
            scenarios,
            runs,
            tenants: peers.tenants.clone(),
            peers,
        }
    }

    /// The steps a run would take before its first wait or its end, in
    /// words; branches are decided on the contact as it is now (read from
    /// contacts), nothing is changed.
    async fn plan(
        &self,
        tenant_id: &str,
        user: &str,
        program: &crate::program::Program,
        can_reply: bool,
    ) -> Result<Vec<(String, String)>, Status> {
        use crate::program::Op;
        use hibiki_proto::scenario::v1::{step, switch_rich_menu_action, wait_action};
        let mut contact = None;
        let mut steps = Vec::new();
        let mut reply = can_reply;
        let mut pc = 0;
        while let Some(op) = program.ops.get(pc) {
            if steps.len() > crate::definition::MAX_STEPS {
                break;
            }
            match op {
                Op::Jump(to) => {
                    pc = *to;
                    continue;
                }
                Op::Branch {
                    step_id,
                    condition,
                    otherwise,
                } => {
                    if contact.is_none() {
                        contact = Some(
                            self.peers
                                .contacts
                                .clone()
                                .get_contact(hibiki_proto::contacts::v1::GetContactRequest {
                                    contact: Some(hibiki_proto::common::v1::ContactRef {
                                        tenant_id: tenant_id.to_owned(),
                                        line_user_id: user.to_owned(),
                                    }),
                                })
                                .await
                                .map(|c| c.into_inner())
                                // A contact not seen yet has no tags.
                                .unwrap_or_default(),
                        );
                    }
                    let known = contact.as_ref().expect("just read");
                    let segments = known.segment_ids.iter().cloned().collect();
                    let holds = crate::conditions::holds(condition, known, &segments);
                    steps.push((
                        step_id.clone(),
                        format!(
                            "branch: the condition {} (then the {} steps)",
                            if holds { "holds" } else { "does not hold" },
                            if holds { "`then`" } else { "`else`" }
                        ),
                    ));
                    pc = if holds { pc + 1 } else { *otherwise };
                    continue;
                }
                Op::Step(s) => {
                    let (description, last) = match &s.action {
                        Some(step::Action::AddTags(t)) => {
                            (format!("add tags {}", t.tags.join(", ")), false)
                        }
                        Some(step::Action::RemoveTags(t)) => {
                            (format!("remove tags {}", t.tags.join(", ")), false)
                        }
                        Some(step::Action::SetAttributes(a)) => {
                            let mut keys: Vec<&str> = a.set.keys().map(String::as_str).collect();
                            keys.sort_unstable();
                            (format!("set attributes {}", keys.join(", ")), false)
                        }
                        Some(step::Action::SwitchRichMenu(m)) => (
                            match &m.menu {
                                Some(switch_rich_menu_action::Menu::Alias(a)) => {
                                    format!("switch the rich menu to alias {a}")
                                }
                                Some(switch_rich_menu_action::Menu::RichMenuId(id)) => {
                                    format!("switch the rich menu to {id}")
                                }
                                None => "switch the rich menu".into(),
                            },
                            false,
                        ),
                        Some(step::Action::SendMessages(m)) => {
                            let how = if reply { "as a reply" } else { "as a push" };
                            reply = false;
                            (
                                format!("send {} message(s) {how}", m.messages_json.len()),
                                false,
                            )
                        }
                        Some(step::Action::Wait(w)) => (
                            match &w.until {
                                Some(wait_action::Until::Duration(d)) => {
                                    format!("wait {} s (the plan ends here)", d.seconds)
                                }
                                Some(wait_action::Until::TimeOfDay(t)) => format!(
                                    "wait until {:02}:{:02} in the tenant's time zone (the plan ends here)",
                                    t.hour, t.minute
                                ),
                                None => "wait".into(),
                            },
                            true,
                        ),
                        Some(step::Action::Stop(_)) => ("stop".into(), true),
                        _ => ("(unknown step)".into(), true),
                    };
                    steps.push((s.id.clone(), description));
                    if last {
                        break;
                    }
                    pc += 1;
                }
            }
        }
        Ok(steps)
    }

    /// The channel a manual run sends from: the scenario's own, or the
    /// tenant's only channel.
    async fn manual_channel(
        &self,
        tenant_id: &str,
        definition: &hibiki_proto::scenario::v1::ScenarioDefinition,
    ) -> Result<String, Status> {
        if !definition.channel_id.is_empty() {
            return Ok(definition.channel_id.clone());
        }
        let channels = self
            .peers
            .tenants
            .clone()
            .list_channels(hibiki_proto::contacts::v1::ListChannelsRequest {
                tenant_id: tenant_id.to_owned(),
            })
            .await?
            .into_inner()
            .channels;
        match channels.as_slice() {
            [only] => Ok(only.channel_id.clone()),
            [] => Err(Status::failed_precondition(format!(
                "tenant {tenant_id:?} has no LINE channel to send from"
            ))),
            _ => Err(Status::failed_precondition(
                "the tenant has several channels: set channel_id on the scenario",
            )),
        }
    }

    /// Queues a manual run for one contact; true when it is new.
    async fn start_manual(
        &self,
        scenario: &hibiki_proto::scenario::v1::Scenario,
        channel_id: &str,
        line_user_id: &str,
        trigger: String,
    ) -> Result<(bool, String), Status> {
        let definition = scenario.definition.as_ref().expect("a stored definition");
        let run_id = crate::executor::run_id(&scenario.tenant_id, &scenario.scenario_id, &trigger);
        let new = crate::runs::NewRun {
            tenant_id: scenario.tenant_id.clone(),
            run_id: run_id.clone(),
            scenario_id: scenario.scenario_id.clone(),
            version: scenario.version,
            line_user_id: line_user_id.to_owned(),
            channel_id: channel_id.to_owned(),
            trigger_event_id: trigger,
            reply_token: String::new(),
            reply_until: None,
            traceparent: hibiki_runtime::telemetry::current_trace_context().traceparent,
            queued: true,
        };
        let reentry = definition
            .options
            .as_ref()
            .map(|o| o.reentry())
            .unwrap_or_default();
        Ok(match self.runs.start(&new, reentry).await? {
            crate::runs::Started::New(_) => (true, run_id),
            crate::runs::Started::Before(run) => (false, run.run_id),
            crate::runs::Started::Skipped(_) => (false, String::new()),
        })
    }

    /// NOT_FOUND unless contacts knows the tenant.
    async fn require_tenant(&self, tenant_id: &str) -> Result<(), ServiceError> {
        match self
            .tenants
            .clone()
            .get_tenant(GetTenantRequest {
                tenant_id: tenant_id.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => {
                Err(ServiceError::NotFound(format!("tenant {tenant_id:?}")))
            }
            Err(s) => Err(ServiceError::Unavailable(format!(
                "contacts: {}",
                s.message()
            ))),
        }
    }
}

fn authorize<T>(request: &Request<T>, tenant_id: &str) -> Result<(), Status> {
    Caller::authorize_request(request, tenant_id)
}

fn require_id(scenario_id: &str) -> Result<(), Status> {
    if scenario_id.is_empty() {
        return Err(Status::invalid_argument("scenario_id: must not be empty"));
    }
    Ok(())
}

use hibiki_runtime::page::{decode_token, encode_token};

fn bad_token() -> Status {
    Status::invalid_argument("page.page_token: not a token issued by this listing")
}

#[tonic::async_trait]
impl ScenarioService for ScenarioApi {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<Scenario>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        let (definition, yaml) = match &r.source {
            None => {
                return Err(Status::invalid_argument(
                    "source: a definition or its YAML must be set",
                ));
            }
            Some(apply_request::Source::Definition(d)) => (d.clone(), String::new()),
            Some(apply_request::Source::Yaml(text)) => (
                definition::from_yaml(text)
                    .map_err(|e| Status::invalid_argument(format!("yaml: {e}")))?,
                text.clone(),
            ),
        };
        definition::check(&definition).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.require_tenant(&r.tenant_id).await?;
        let scenario = self
            .scenarios
            .apply(&r.tenant_id, &definition, &yaml, !r.start_disabled)
            .await?;
        tracing::info!(tenant = %r.tenant_id, scenario = %scenario.scenario_id, version = scenario.version, "scenario applied");
        Ok(Response::new(scenario))
    }

    async fn get_scenario(
        &self,
        request: Request<GetScenarioRequest>,
    ) -> Result<Response<Scenario>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        require_id(&r.scenario_id)?;
        Ok(Response::new(
            self.scenarios
                .get(&r.tenant_id, &r.scenario_id, r.version.max(0))
                .await?,
        ))
    }

    async fn list_scenarios(
        &self,
        request: Request<ListScenariosRequest>,
    ) -> Result<Response<ListScenariosResponse>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        let (size, token) = r
            .page
            .as_ref()
            .map_or((0, ""), |p| (p.page_size, p.page_token.as_str()));
        let size = hibiki_runtime::page::size(size);
        let after = if token.is_empty() {
            String::new()
        } else {
            decode_token(token).ok_or_else(|| {
                Status::invalid_argument("page.page_token: not a token issued by this listing")
            })?
        };
        let mut scenarios = self.scenarios.list(&r.tenant_id, &after, size + 1).await?;
        let next = if scenarios.len() as i64 > size {
            scenarios.truncate(size as usize);
            scenarios
                .last()
                .and_then(|s| s.definition.as_ref())
                .map(|d| encode_token(&d.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListScenariosResponse {
            scenarios,
            page: Some(hibiki_proto::common::v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn list_versions(
        &self,
        request: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        require_id(&r.scenario_id)?;
        Ok(Response::new(ListVersionsResponse {
            versions: self
                .scenarios
                .versions(&r.tenant_id, &r.scenario_id)
                .await?,
        }))
    }

    async fn disable(
        &self,
        request: Request<DisableRequest>,
    ) -> Result<Response<Scenario>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        require_id(&r.scenario_id)?;
        Ok(Response::new(
            self.scenarios
                .set_enabled(&r.tenant_id, &r.scenario_id, false)
                .await?,
        ))
    }

    async fn enable(&self, request: Request<EnableRequest>) -> Result<Response<Scenario>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        require_id(&r.scenario_id)?;
        Ok(Response::new(
            self.scenarios
                .set_enabled(&r.tenant_id, &r.scenario_id, true)
                .await?,
        ))
    }

    async fn dry_run(
        &self,
        request: Request<DryRunRequest>,
    ) -> Result<Response<DryRunResponse>, Status> {
        use hibiki_proto::scenario::v1::{PlannedRun, PlannedStep, SkippedScenario};
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        let event = r
            .event
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("event: must be set"))?;
        if event.tenant_id != r.tenant_id {
            return Err(Status::invalid_argument(
                "event.tenant_id: must be the request's tenant",
            ));
        }
        let user = event
            .source
            .as_ref()
            .map(|s| s.user_id.clone())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Status::invalid_argument("event.source.user_id: must be set"))?;
        self.require_tenant(&r.tenant_id).await?;
        let mut response = DryRunResponse::default();
        for scenario in self.scenarios.enabled(&r.tenant_id).await? {
            if !r.scenario_id.is_empty() && scenario.scenario_id != r.scenario_id {
                continue;
            }
            let definition = scenario.definition.clone().unwrap_or_default();
            let Ok(matcher) = crate::matching::Matcher::new(&definition) else {
                continue;
            };
            if !matcher.matches(event) {
                continue;
            }
            let policy = definition
                .options
                .as_ref()
                .map(|o| o.reentry())
                .unwrap_or_default();
            if let Some(reason) = self
                .runs
                .would_not_start(
                    &r.tenant_id,
                    &scenario.scenario_id,
                    &user,
                    &event.webhook_event_id,
                    policy,
                )
                .await?
            {
                response.skipped.push(SkippedScenario {
                    scenario_id: scenario.scenario_id.clone(),
                    reason,
                });
                continue;
            }
            let program = crate::program::Program::compile(&definition);
            let steps = self
                .plan(&r.tenant_id, &user, &program, !event.reply_token.is_empty())
                .await?;
            response.runs.push(PlannedRun {
                scenario_id: scenario.scenario_id.clone(),
                version: scenario.version,
                steps: steps
                    .into_iter()
                    .map(|(step_id, description)| PlannedStep {
                        step_id,
                        description,
                    })
                    .collect(),
            });
        }
        Ok(Response::new(response))
    }

    async fn start_run(
        &self,
        request: Request<StartRunRequest>,
    ) -> Result<Response<StartRunResponse>, Status> {
        use hibiki_proto::scenario::v1::{start_run_request, trigger};
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        require_id(&r.scenario_id)?;
        if r.idempotency_key.is_empty() {
            return Err(Status::invalid_argument(
                "idempotency_key: must not be empty",
            ));
        }
        let scenario = self.scenarios.get(&r.tenant_id, &r.scenario_id, 0).await?;
        if !scenario.enabled {
            return Err(Status::failed_precondition(format!(
                "scenario {:?} is disabled",
                r.scenario_id
            )));
        }
        let definition = scenario.definition.clone().unwrap_or_default();
        if !matches!(
            definition.trigger.as_ref().and_then(|t| t.kind.as_ref()),
            Some(trigger::Kind::Manual(_))
        ) {
            return Err(Status::failed_precondition(format!(
                "scenario {:?} has no manual trigger",
                r.scenario_id
            )));
        }
        let channel = self.manual_channel(&r.tenant_id, &definition).await?;
        let key = &r.idempotency_key;
        match &r.target {
            None => Err(Status::invalid_argument(
                "target: line_user_id or segment_id must be set",
            )),
            Some(start_run_request::Target::LineUserId(user)) => {
                // The contact must exist.
                self.peers
                    .contacts
                    .clone()
                    .get_contact(hibiki_proto::contacts::v1::GetContactRequest {
                        contact: Some(hibiki_proto::common::v1::ContactRef {
                            tenant_id: r.tenant_id.clone(),
                            line_user_id: user.clone(),
                        }),
                    })
                    .await?;
                let (new, run_id) = self
                    .start_manual(&scenario, &channel, user, format!("manual:{key}"))
                    .await?;
                Ok(Response::new(StartRunResponse {
                    started: i64::from(new),
                    run_id,
                }))
            }
            Some(start_run_request::Target::SegmentId(segment)) => {
                let mut started = 0;
                let mut token = String::new();
                loop {
                    let page = self
                        .peers
                        .segments
                        .clone()
                        .list_segment_members(
                            hibiki_proto::contacts::v1::ListSegmentMembersRequest {
                                tenant_id: r.tenant_id.clone(),
                                segment_id: segment.clone(),
                                page: Some(hibiki_proto::common::v1::PageRequest {
                                    page_size: 1000,
                                    page_token: token,
                                }),
                            },
                        )
                        .await?
                        .into_inner();
                    for user in &page.line_user_ids {
                        let (new, _) = self
                            .start_manual(&scenario, &channel, user, format!("manual:{key}:{user}"))
                            .await?;
                        started += i64::from(new);
                    }
                    token = page.page.map(|p| p.next_page_token).unwrap_or_default();
                    if token.is_empty() {
                        break;
                    }
                }
                Ok(Response::new(StartRunResponse {
                    started,
                    run_id: String::new(),
                }))
            }
        }
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        let (user, scenario) = (
            (!r.line_user_id.is_empty()).then_some(r.line_user_id.as_str()),
            (!r.scenario_id.is_empty()).then_some(r.scenario_id.as_str()),
        );
        if user.is_some() == scenario.is_some() {
            return Err(Status::invalid_argument(
                "line_user_id, scenario_id: exactly one must be set",
            ));
        }
        let (size, token) = r
            .page
            .as_ref()
            .map_or((0, ""), |p| (p.page_size, p.page_token.as_str()));
        let size = hibiki_runtime::page::size(size);
        let before = if token.is_empty() {
            None
        } else {
            let text = decode_token(token).ok_or_else(bad_token)?;
            let (micros, id) = text.split_once(':').ok_or_else(bad_token)?;
            let at = micros
                .parse()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_micros)
                .ok_or_else(bad_token)?;
            Some((at, id.to_owned()))
        };
        let mut rows = self
            .runs
            .list(&r.tenant_id, user, scenario, before, size + 1)
            .await?;
        let next = if rows.len() as i64 > size {
            rows.truncate(size as usize);
            rows.last()
                .map(|r| encode_token(&format!("{}:{}", r.started_at.timestamp_micros(), r.run_id)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListRunsResponse {
            runs: rows.iter().map(|r| r.to_proto()).collect(),
            page: Some(hibiki_proto::common::v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        if r.run_id.is_empty() {
            return Err(Status::invalid_argument("run_id: must not be empty"));
        }
        Ok(Response::new(self.runs.get(&r.tenant_id, &r.run_id).await?))
    }

    async fn get_funnel(
        &self,
        request: Request<GetFunnelRequest>,
    ) -> Result<Response<Funnel>, Status> {
        let r = request.get_ref();
        authorize(&request, &r.tenant_id)?;
        require_id(&r.scenario_id)?;
        let time = |t: &Option<prost_types::Timestamp>, field: &str| match t {
            None => Ok(None),
            Some(t) => hibiki_runtime::timestamp::from_proto(t)
                .map(Some)
                .ok_or_else(|| Status::invalid_argument(format!("{field}: not a valid time"))),
        };
        let from = time(&r.started_from, "started_from")?;
        let before = time(&r.started_before, "started_before")?;
        if let (Some(f), Some(b)) = (from, before)
            && b < f
        {
            return Err(Status::invalid_argument(
                "started_before: before started_from",
            ));
        }
        // The version's steps give the order (NOT_FOUND when unknown).
        let scenario = self
            .scenarios
            .get(&r.tenant_id, &r.scenario_id, r.version)
            .await?;
        let program = Program::compile(&scenario.definition.unwrap_or_default());
        let ((entered, completed, ended_early), reached) = self
            .runs
            .funnel(&r.tenant_id, &r.scenario_id, r.version, from, before)
            .await?;
        let mut reached: std::collections::HashMap<String, i64> = reached.into_iter().collect();
        let mut steps: Vec<FunnelStep> = program
            .step_ids()
            .into_iter()
            .map(|id| FunnelStep {
                step_id: id.to_owned(),
                reached: reached.remove(id).unwrap_or(0),
            })
            .collect();
        // Steps only older versions had, after the current ones.
        let mut older: Vec<(String, i64)> = reached.into_iter().collect();
        older.sort();
        steps.extend(
            older
                .into_iter()
                .map(|(step_id, reached)| FunnelStep { step_id, reached }),
        );
        Ok(Response::new(Funnel {
            entered,
            steps,
            completed,
            ended_early,
        }))
    }
}
