//! Scenarios and their versions in PostgreSQL.

use chrono::{DateTime, Utc};
use hibiki_proto::scenario::v1::{Scenario, ScenarioDefinition};
use hibiki_runtime::error::{ServiceError, is_unique_violation};
use hibiki_runtime::timestamp;
use prost::Message;
use rand::Rng;
use sqlx::PgPool;

/// Result of a store operation.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// The scenarios of every tenant.
#[derive(Clone)]
pub struct Scenarios {
    pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct Row {
    tenant_id: String,
    scenario_id: String,
    version: i64,
    definition: Vec<u8>,
    source_yaml: String,
    enabled: bool,
    created_at: DateTime<Utc>,
}

impl Row {
    fn into_proto(self) -> Result<Scenario> {
        let definition = ScenarioDefinition::decode(self.definition.as_slice()).map_err(|e| {
            ServiceError::Internal(format!(
                "scenario {} v{}: {e}",
                self.scenario_id, self.version
            ))
        })?;
        Ok(Scenario {
            tenant_id: self.tenant_id,
            scenario_id: self.scenario_id,
            version: self.version,
            definition: Some(definition),
            enabled: self.enabled,
            created_at: Some(timestamp::to_proto(self.created_at)),
            source_yaml: self.source_yaml,
        })
    }
}

/// A scenario-at-a-version query: the join, then `$rest` (a literal, so the
/// statement stays static SQL).
macro_rules! select {
    ($rest:literal) => {
        concat!(
            "SELECT s.tenant_id, s.scenario_id, v.version, v.definition, v.source_yaml,
                    s.enabled, v.created_at
               FROM scenarios s
               JOIN scenario_versions v USING (tenant_id, scenario_id) ",
            $rest
        )
    };
}

fn new_id() -> String {
    let b: [u8; 8] = rand::rng().random();
    format!("sc_{}", hex::encode(b))
}

fn not_found(tenant_id: &str, scenario_id: &str) -> ServiceError {
    ServiceError::NotFound(format!("scenario {scenario_id:?} of tenant {tenant_id:?}"))
}

impl Scenarios {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Stores `definition` as a new scenario or a new version of the one
    /// with its name; an unchanged definition returns the current version.
    pub async fn apply(
        &self,
        tenant_id: &str,
        definition: &ScenarioDefinition,
        source_yaml: &str,
        enabled: bool,
    ) -> Result<Scenario> {
        // Two first applies of one name race on the unique name: the loser
        // goes again and finds the winner's scenario.
        for _ in 0..3 {
            match self
                .try_apply(tenant_id, definition, source_yaml, enabled)
                .await
            {
                Err(ServiceError::AlreadyExists(_)) => continue,
                other => return other,
            }
        }
        Err(ServiceError::Aborted(
            "concurrent applies of this scenario; retry".into(),
        ))
    }

    async fn try_apply(
        &self,
        tenant_id: &str,
        definition: &ScenarioDefinition,
        source_yaml: &str,
        enabled: bool,
    ) -> Result<Scenario> {
        let mut tx = self.pool.begin().await?;
        let current: Option<(String, i64)> = sqlx::query_as(
            "SELECT scenario_id, current_version FROM scenarios
              WHERE tenant_id = $1 AND name = $2 FOR UPDATE",
        )
        .bind(tenant_id)
        .bind(&definition.name)
        .fetch_optional(&mut *tx)
        .await?;
        let (scenario_id, version) = match current {
            None => {
                let id = new_id();
                let inserted = sqlx::query(
                    "INSERT INTO scenarios (tenant_id, scenario_id, name, current_version, enabled)
                     VALUES ($1, $2, $3, 1, $4)",
                )
                .bind(tenant_id)
                .bind(&id)
                .bind(&definition.name)
                .bind(enabled)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Err(e) if is_unique_violation(&e) => {
                        return Err(ServiceError::AlreadyExists(definition.name.clone()));
                    }
                    other => other?,
                };
                (id, 1)
            }
            Some((id, version)) => {
                let (bytes,): (Vec<u8>,) = sqlx::query_as(
                    "SELECT definition FROM scenario_versions
                      WHERE tenant_id = $1 AND scenario_id = $2 AND version = $3",
                )
                .bind(tenant_id)
                .bind(&id)
                .bind(version)
                .fetch_one(&mut *tx)
                .await?;
                if ScenarioDefinition::decode(bytes.as_slice()).ok().as_ref() == Some(definition) {
                    tx.commit().await?;
                    return self.get(tenant_id, &id, 0).await;
                }
                sqlx::query(
                    "UPDATE scenarios SET current_version = $3, enabled = $4, updated_at = now()
                      WHERE tenant_id = $1 AND scenario_id = $2",
                )
                .bind(tenant_id)
                .bind(&id)
                .bind(version + 1)
                .bind(enabled)
                .execute(&mut *tx)
                .await?;
                (id, version + 1)
            }
        };
        sqlx::query(
            "INSERT INTO scenario_versions (tenant_id, scenario_id, version, definition, source_yaml)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(tenant_id)
        .bind(&scenario_id)
        .bind(version)
        .bind(definition.encode_to_vec())
        .bind(source_yaml)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.get(tenant_id, &scenario_id, version).await
    }

    /// A scenario at `version` (0: its current one).
    pub async fn get(&self, tenant_id: &str, scenario_id: &str, version: i64) -> Result<Scenario> {
        let row: Option<Row> = sqlx::query_as(select!(
            "WHERE s.tenant_id = $1 AND s.scenario_id = $2
               AND v.version = CASE WHEN $3 = 0 THEN s.current_version ELSE $3 END"
        ))
        .bind(tenant_id)
        .bind(scenario_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => r.into_proto(),
            None if version != 0 => Err(ServiceError::NotFound(format!(
                "version {version} of scenario {scenario_id:?} of tenant {tenant_id:?}"
            ))),
            None => Err(not_found(tenant_id, scenario_id)),
        }
    }

    /// A page of a tenant's scenarios by name, after `after` (a name).
    pub async fn list(&self, tenant_id: &str, after: &str, limit: i64) -> Result<Vec<Scenario>> {
        let rows: Vec<Row> = sqlx::query_as(select!(
            "WHERE s.tenant_id = $1 AND v.version = s.current_version AND s.name > $2
              ORDER BY s.name LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Row::into_proto).collect()
    }

    /// A tenant's enabled scenarios at their current versions.
    pub async fn enabled(&self, tenant_id: &str) -> Result<Vec<Scenario>> {
        let rows: Vec<Row> = sqlx::query_as(select!(
            "WHERE s.tenant_id = $1 AND s.enabled AND v.version = s.current_version
              ORDER BY s.name"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Row::into_proto).collect()
    }

    /// Every version of a scenario, newest first.
    pub async fn versions(&self, tenant_id: &str, scenario_id: &str) -> Result<Vec<Scenario>> {
        let rows: Vec<Row> = sqlx::query_as(select!(
            "WHERE s.tenant_id = $1 AND s.scenario_id = $2 ORDER BY v.version DESC"
        ))
        .bind(tenant_id)
        .bind(scenario_id)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Err(not_found(tenant_id, scenario_id));
        }
        rows.into_iter().map(Row::into_proto).collect()
    }

    /// Enables or disables a scenario.
    pub async fn set_enabled(
        &self,
        tenant_id: &str,
        scenario_id: &str,
        enabled: bool,
    ) -> Result<Scenario> {
        let done = sqlx::query(
            "UPDATE scenarios SET enabled = $3, updated_at = now()
              WHERE tenant_id = $1 AND scenario_id = $2",
        )
        .bind(tenant_id)
        .bind(scenario_id)
        .bind(enabled)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(not_found(tenant_id, scenario_id));
        }
        self.get(tenant_id, scenario_id, 0).await
    }
}
