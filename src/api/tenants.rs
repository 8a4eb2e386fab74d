//! The `Tenants` service.

use rand::{Rng, distr::Alphanumeric};
use tonic::{Request, Response, Status};

use super::timestamp_from_millis;
use crate::paging::{decode_page_token, encode_page_token, page_size};
use crate::{
    auth::caller_name,
    domain::{TenantId, now_millis},
    error::{Error, Result},
    pb::{self, tenants_server::Tenants},
    store::{Store, Tenant},
};

/// Longest display name, in characters.
const MAX_NAME_CHARS: usize = 256;
/// Attempts at a fresh generated id before giving up.
const GENERATE_ATTEMPTS: usize = 5;

/// Handlers for `rolecheck.v1.Tenants`.
pub struct TenantsApi {
    store: Store,
}

impl TenantsApi {
    /// Serves tenants from `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    async fn create(&self, id: Option<TenantId>, name: String, caller: &str) -> Result<Tenant> {
        let attempts = if id.is_some() { 1 } else { GENERATE_ATTEMPTS };
        for _ in 0..attempts {
            let tenant = Tenant {
                id: id.clone().unwrap_or_else(generate_id),
                name: name.clone(),
                created_at_ms: now_millis(),
            };
            match self.store.writes.create_tenant(&tenant, caller).await {
                Ok((_, created)) => return Ok(created),
                Err(Error::AlreadyExists(_)) if id.is_none() => continue,
                Err(err) => return Err(err),
            }
        }
        Err(Error::Unavailable("could not generate a free tenant id, retry".into()))
    }
}

/// An 8-char lowercase alphanumeric id.
fn generate_id() -> TenantId {
    let id: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(8)
        .map(|b| char::from(b).to_ascii_lowercase())
        .collect();
    TenantId::trusted(id)
}

fn parse_name(name: &str) -> Result<String> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            format!("must be 1-{MAX_NAME_CHARS} characters without control characters"),
        ));
    }
    Ok(name.to_owned())
}

fn to_pb(tenant: Tenant) -> pb::Tenant {
    pb::Tenant {
        tenant_id: tenant.id.as_str().to_owned(),
        name: tenant.name,
        created_at: Some(timestamp_from_millis(tenant.created_at_ms)),
    }
}

#[tonic::async_trait]
impl Tenants for TenantsApi {
    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller_name(&request);
        let req = request.into_inner();
        let id = match req.tenant_id.as_str() {
            "" => None,
            id => Some(TenantId::parse("tenant_id", id)?),
        };
        let name = parse_name(&req.name)?;
        Ok(Response::new(to_pb(self.create(id, name, &caller).await?)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        Ok(Response::new(to_pb(self.store.tenants.get_tenant(&id).await?)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(req.page_size)?;
        let after = decode_page_token("tenants", &req.page_token)?
            .map(|id| TenantId::parse("page_token", &id))
            .transpose()?;
        let mut tenants = self.store.tenants.list_tenants(after.as_ref(), limit + 1).await?;
        let next_page_token = if tenants.len() > limit as usize {
            tenants.truncate(limit as usize);
            tenants.last().map(|t| encode_page_token("tenants", t.id.as_str())).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.into_iter().map(to_pb).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant_id))]
    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        let revision = self.store.writes.delete_tenant(&id, &caller_name(&request)).await?;
        Ok(Response::new(pb::DeleteTenantResponse { revision }))
    }
}
