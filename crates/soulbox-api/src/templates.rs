//! Template routes: what the E2B SDK's `Template.build()` and the template management calls
//! use (protocol doc §3.7), plus the upload URL the file-upload step `PUT`s to.
//!
//! The upload route carries no API key (the SDK sends none to the URL it is given): the
//! one-time token in its path, handed out by the authenticated `GET /templates/{id}/files/
//! {hash}`, is the authorisation.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post, put};
use serde::Deserialize;
use soulbox_core::{BuildSource, BuildSpec, BuildView, CoreError, ENVD_VERSION, Manager, SdkStep};
use soulbox_templates::dockerfile::Base;
use soulbox_wire::rest::{
    AssignTemplateTagsRequest, AssignedTemplateTags, BuildLogEntry, BuildStatusReason,
    DeleteTemplateTagsRequest, TemplateAliasResponse, TemplateBuildFileUpload, TemplateBuildInfo,
    TemplateBuildRequestV3, TemplateBuildStartV2, TemplateListing, TemplateRequestResponseV3,
    TemplateTag,
};

use crate::{ApiError, parse_json};

/// Path of the upload URL (followed by the token).
pub const UPLOAD_PATH: &str = "/template-files";
/// Log entries per status answer when the client asks for no limit (E2B's page size).
const DEFAULT_LOG_LIMIT: usize = 100;

/// Routes that need an API key.
pub fn authenticated() -> Router<Manager> {
    Router::new()
        .route("/v3/templates", post(request_build))
        .route("/templates", get(list))
        .route("/templates/{id}", axum::routing::delete(delete))
        .route("/templates/{id}/files/{hash}", get(file_link))
        .route("/v2/templates/{id}/builds/{build}", post(start_build))
        .route("/templates/{id}/builds/{build}/status", get(status))
        .route("/templates/aliases/{alias}", get(alias))
        .route("/templates/tags", post(assign_tags).delete(remove_tags))
        .route("/templates/{id}/tags", get(tags))
}

/// The upload route (authorised by its token).
pub fn public() -> Router<Manager> {
    Router::new().route(&format!("{UPLOAD_PATH}/{{token}}"), put(upload))
}

async fn request_build(
    State(m): State<Manager>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<TemplateRequestResponseV3>), ApiError> {
    let req: TemplateBuildRequestV3 = parse_json(&body)?;
    let name = req
        .name
        .or(req.alias)
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let (def, build_id, tags) = m
        .request_template_build(
            &name,
            &req.tags.unwrap_or_default(),
            req.cpu_count,
            req.memory_mb,
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(TemplateRequestResponseV3 {
            template_id: def.id,
            build_id,
            public: false,
            names: vec![def.name.clone()],
            tags,
            aliases: vec![def.name],
        }),
    ))
}

async fn file_link(
    State(m): State<Manager>,
    Path((_id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, axum::Json<TemplateBuildFileUpload>), ApiError> {
    let (present, token) = m.template_file_link(&hash)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("a Host header is needed to form the upload URL"))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TemplateBuildFileUpload {
            present,
            url: token.map(|t| format!("http://{host}{UPLOAD_PATH}/{t}")),
        }),
    ))
}

async fn upload(
    State(m): State<Manager>,
    Path(token): Path<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    m.save_template_file(&token, body).await?;
    Ok(StatusCode::CREATED)
}

async fn start_build(
    State(m): State<Manager>,
    Path((id, build)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: TemplateBuildStartV2 = parse_json(&body)?;
    if req.from_image_registry.is_some() {
        return Err(ApiError::bad_request(
            "registry credentials are not supported: SoulBox pulls no images from registries",
        ));
    }
    let source = match (req.dockerfile, req.from_image, req.from_template) {
        (Some(text), None, None) => BuildSource::Dockerfile {
            text,
            files: req.dockerfile_files,
        },
        (None, Some(image), None) => BuildSource::Steps {
            from: Base::parse(&image).map_err(ApiError::bad_request)?,
            steps: sdk_steps(req.steps),
        },
        (None, None, Some(template)) => BuildSource::Steps {
            from: Base::Template(template),
            steps: sdk_steps(req.steps),
        },
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of fromImage, fromTemplate (or dockerfile)",
            ));
        }
    };
    m.start_template_build(
        &id,
        &build,
        BuildSpec {
            source,
            start_cmd: req.start_cmd,
            ready_cmd: req.ready_cmd,
            force: req.force.unwrap_or(false),
        },
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

fn sdk_steps(steps: Vec<soulbox_wire::rest::TemplateStep>) -> Vec<SdkStep> {
    steps
        .into_iter()
        .map(|s| SdkStep {
            kind: s.kind,
            args: s.args,
            files_hash: s.files_hash,
            force: s.force.unwrap_or(false),
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    logs_offset: Option<usize>,
    limit: Option<usize>,
}

async fn status(
    State(m): State<Manager>,
    Path((id, build)): Path<(String, String)>,
    Query(q): Query<StatusQuery>,
) -> Result<axum::Json<TemplateBuildInfo>, ApiError> {
    let view = m
        .template_build_status(
            &id,
            &build,
            q.logs_offset.unwrap_or(0),
            q.limit.unwrap_or(DEFAULT_LOG_LIMIT).clamp(1, 1000),
        )
        .await?;
    Ok(axum::Json(build_info(view)))
}

fn build_info(view: BuildView) -> TemplateBuildInfo {
    let entries: Vec<BuildLogEntry> = view
        .logs
        .into_iter()
        .map(|l| BuildLogEntry {
            timestamp: l.timestamp,
            level: l.level.to_owned(),
            message: l.message,
            step: l.step,
        })
        .collect();
    TemplateBuildInfo {
        template_id: view.template_id,
        build_id: view.build_id,
        status: view.status.as_str().to_owned(),
        log_entries: entries,
        logs: Vec::new(),
        reason: view.reason.map(|(message, step)| BuildStatusReason {
            message,
            step,
            log_entries: Vec::new(),
        }),
    }
}

async fn alias(
    State(m): State<Manager>,
    Path(alias): Path<String>,
) -> Result<axum::Json<TemplateAliasResponse>, ApiError> {
    let def = m.find_template(&alias).await?;
    if def.name != alias {
        return Err(CoreError::TemplateNotFound(alias).into());
    }
    Ok(axum::Json(TemplateAliasResponse {
        template_id: def.id,
        public: false,
    }))
}

async fn list(State(m): State<Manager>) -> Result<axum::Json<Vec<TemplateListing>>, ApiError> {
    let out = m
        .list_templates()
        .await?
        .into_iter()
        .map(|t| {
            let c = t.config.unwrap_or_default();
            let b = t.build;
            TemplateListing {
                template_id: t.def.id,
                build_id: b.as_ref().map(|b| b.id.clone()).unwrap_or_default(),
                cpu_count: c.cpu_count,
                memory_mb: c.memory_mb,
                disk_size_mb: c.disk_mb,
                public: false,
                aliases: vec![t.def.name.clone()],
                names: vec![t.def.name],
                created_at: t.def.created_at,
                updated_at: b
                    .as_ref()
                    .and_then(|b| b.finished_at)
                    .unwrap_or(t.def.created_at),
                created_by: None,
                last_spawned_at: None,
                spawn_count: 0,
                build_count: t.build_count as u64,
                envd_version: ENVD_VERSION.to_owned(),
                build_status: b
                    .map(|b| b.status.as_str().to_owned())
                    .unwrap_or_else(|| "waiting".into()),
            }
        })
        .collect();
    Ok(axum::Json(out))
}

async fn delete(State(m): State<Manager>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let in_use = m.delete_template(&id).await?;
    if !in_use.is_empty() {
        tracing::info!(template = %id, sandboxes = in_use.len(), "template deleted; its layers stay until its sandboxes are gone");
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn tags(
    State(m): State<Manager>,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<TemplateTag>>, ApiError> {
    let out = m
        .template_tags(&id)
        .await?
        .into_iter()
        .map(|t| TemplateTag {
            tag: t.tag,
            build_id: t.build_id,
            created_at: t.created_at,
        })
        .collect();
    Ok(axum::Json(out))
}

async fn assign_tags(
    State(m): State<Manager>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<AssignedTemplateTags>), ApiError> {
    let req: AssignTemplateTagsRequest = parse_json(&body)?;
    let build_id = m.assign_template_tags(&req.target, &req.tags).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(AssignedTemplateTags {
            tags: req.tags,
            build_id,
        }),
    ))
}

async fn remove_tags(State(m): State<Manager>, body: Bytes) -> Result<StatusCode, ApiError> {
    let req: DeleteTemplateTagsRequest = parse_json(&body)?;
    m.remove_template_tags(&req.name, &req.tags).await?;
    Ok(StatusCode::NO_CONTENT)
}
