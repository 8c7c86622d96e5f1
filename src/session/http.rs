//! The public listener: `POST /` (an envelope), `GET /` with `Upgrade: websocket`, and
//! `GET /invitation`.
//!
//! An HTTP POST is a short-lived session: with `~transport.return_route` its reply comes back
//! in the response body (Credo 0.6.3 sends pickup messages this way even while its socket is
//! open); without, replies go to the sender's own endpoint.

use super::unfinished::Share;
use super::{outbound, Shared};
use crate::didcomm::message::ReturnRoute;
use crate::protocols::{oob, ForwardResult, HandleError, TransportKind};
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::Stream;
use serde_json::json;
use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

pub fn configure(cfg: &mut web::ServiceConfig, shared: Arc<Shared>) {
    let limit = shared.cfg.limits.max_envelope_bytes;
    cfg.app_data(web::Data::from(shared))
        .app_data(web::PayloadConfig::new(limit))
        .service(
            web::resource("/")
                .wrap(ErrorHandlers::new().handler(StatusCode::PAYLOAD_TOO_LARGE, too_large))
                .route(web::post().to(post_envelope))
                .route(web::get().to(get_root)),
        )
        .route("/invitation", web::get().to(get_invitation));
}

/// An envelope over `limits.max_envelope_bytes` (refused by the body extractor, as soon as a
/// declared length or the bytes read pass it): answered as every refusal is, in JSON with a
/// stable code, and counted.
fn too_large<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let (req, _) = res.into_parts();
    let Some(shared) = req.app_data::<web::Data<Shared>>() else {
        return Err(actix_web::error::ErrorPayloadTooLarge("envelope too large"));
    };
    shared.metrics.rejected("envelope-too-big", "unknown");
    let limit = shared.cfg.limits.max_envelope_bytes;
    let body = json!({
        "error": "envelope-too-big",
        "reason": format!("the envelope is over limits.max_envelope_bytes ({limit} bytes)"),
    });
    let res = HttpResponse::PayloadTooLarge().json(body);
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, res).map_into_right_body(),
    ))
}

#[derive(serde::Deserialize)]
struct InvitationQuery {
    /// `http` (the default) or `ws`: the transport of the invitation's one service.
    transport: Option<String>,
    /// `v2`: the out-of-band 2.0 invitation (`?_oob=`) from the mediator's did:peer:2.
    didcomm: Option<String>,
}

async fn get_invitation(shared: web::Data<Shared>, q: web::Query<InvitationQuery>) -> HttpResponse {
    let m = &shared.mediator;
    match q.didcomm.as_deref() {
        None | Some("v1") => {}
        Some("v2") => {
            let inv = crate::protocols::v2::invitation(m);
            return HttpResponse::Ok().json(json!({
                "invitation_url": crate::protocols::v2::invitation_url(m, &inv),
                "invitation": inv,
                "did": m.v2.did,
                "did_document": m.v2.doc_json(),
            }));
        }
        Some(other) => {
            return HttpResponse::BadRequest()
                .json(json!({"error": "bad-didcomm", "reason": format!("didcomm={other}: use v1 or v2")}))
        }
    }
    let inv = match q.transport.as_deref() {
        None | Some("http") => oob::public_invitation(m),
        Some("ws") => oob::invitation_over(m, &m.invitation_id, &m.public_ws_url),
        Some(other) => {
            return HttpResponse::BadRequest()
                .json(json!({"error": "bad-transport", "reason": format!("transport={other}: use http or ws")}))
        }
    };
    HttpResponse::Ok().json(json!({ "invitation_url": oob::invitation_url(m, &inv), "invitation": inv }))
}

/// A browser or a wallet resolving an invitation URL: show where to go. (A WebSocket
/// handshake never reaches here: actix-http hands every `Upgrade: websocket` request to
/// [`super::upgrade`].)
async fn get_root(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if req.query_string().contains("_oob=") {
        let q = InvitationQuery {
            transport: None,
            didcomm: Some("v2".into()),
        };
        return get_invitation(shared, web::Query(q)).await;
    }
    if req.query_string().contains("oob=") {
        let q = InvitationQuery {
            transport: None,
            didcomm: None,
        };
        return get_invitation(shared, web::Query(q)).await;
    }
    HttpResponse::Ok().content_type("text/plain").body(format!(
        "mailroom DIDComm mediator (node {}). POST envelopes here, or open a WebSocket. Invitation: {}/invitation\n",
        shared.mediator.node_id, shared.mediator.public_url
    ))
}

/// Refusals as JSON with a stable code; never 200 for something we could not read.
pub fn error_response(e: &HandleError) -> HttpResponse {
    let status =
        actix_web::http::StatusCode::from_u16(e.http_status()).unwrap_or(actix_web::http::StatusCode::BAD_REQUEST);
    // A DIDComm v2 refusal carries a problem report packed for its sender.
    if let HandleError::Problem { packed, .. } = e {
        return HttpResponse::build(status)
            .content_type(crate::didcomm::v2::TYP_ENCRYPTED)
            .body(packed.clone());
    }
    HttpResponse::build(status).json(e.body())
}

/// Reads the body of `POST /`: whole within `limits.message_timeout_ms` of the request's head
/// (a body trickled byte by byte would hold its buffer and its connection for as long as it
/// trickled), within `limits.max_envelope_bytes` (413, answered by [`too_large`]), and within
/// the node's budget for unfinished messages ([`Charged`]; 503 past it).
/// A request body's bytes charged to the node's budget for unfinished messages as they arrive
/// (as received, before any decompression: the bytes a client must send to hold them); past
/// the budget the body ends in an error and `over` says why. The share goes back when the
/// body is read (or dropped).
struct Charged {
    inner: actix_web::dev::Payload,
    share: Share,
    over: Rc<Cell<bool>>,
}

impl Stream for Charged {
    type Item = Result<web::Bytes, actix_web::error::PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(b))) if !this.share.grow(b.len()) => {
                this.over.set(true);
                Poll::Ready(Some(Err(actix_web::error::PayloadError::Overflow)))
            }
            other => other,
        }
    }
}

async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    shared: &Shared,
) -> actix_web::Result<Result<web::Bytes, HttpResponse>> {
    if let Some(refused) = encoded(req, shared) {
        return Ok(Err(refused));
    }
    let limit = std::time::Duration::from_millis(shared.cfg.limits.message_timeout_ms);
    let over = Rc::new(Cell::new(false));
    let charged = Charged {
        inner: payload.into_inner(),
        share: Share::of(&shared.unfinished),
        over: over.clone(),
    };
    let mut payload = actix_web::dev::Payload::from(Box::pin(charged) as actix_http::BoxedPayloadStream);
    match tokio::time::timeout(
        limit,
        <web::Bytes as actix_web::FromRequest>::from_request(req, &mut payload),
    )
    .await
    {
        Ok(Err(_)) if over.get() => {
            shared.metrics.rejected("body-budget", "unknown");
            Ok(Err(HttpResponse::ServiceUnavailable()
                .insert_header((actix_web::http::header::RETRY_AFTER, "1"))
                .insert_header((actix_web::http::header::CONNECTION, "close"))
                .json(json!({
                    "error": "busy",
                    "reason": "the node holds as many unfinished messages as it takes: send again later",
                }))))
        }
        Ok(body) => Ok(Ok(body?)),
        Err(_) => {
            shared.metrics.rejected("message-timeout", "unknown");
            let body = json!({
                "error": "body-timeout",
                "reason": format!(
                    "the body was not whole within limits.message_timeout_ms ({} ms) of the request's head",
                    shared.cfg.limits.message_timeout_ms
                ),
            });
            Ok(Err(HttpResponse::RequestTimeout()
                .insert_header((actix_web::http::header::CONNECTION, "close"))
                .json(body)))
        }
    }
}

/// A 415 for a `POST /` whose body comes with a `Content-Encoding` (other than `identity`),
/// before any of it is read. An envelope is encrypted, so compressing it gains nothing, and a
/// compressed body's bytes are not what it holds in memory: a few KiB of gzip inflate to a
/// whole envelope, so the budget for unfinished messages, charged as bytes arrive, would hold
/// a thousand times what it counts.
fn encoded(req: &HttpRequest, shared: &Shared) -> Option<HttpResponse> {
    let coding = req.headers().get(actix_web::http::header::CONTENT_ENCODING)?;
    if coding.as_bytes().eq_ignore_ascii_case(b"identity") {
        return None;
    }
    shared.metrics.rejected("content-encoding", "unknown");
    Some(
        HttpResponse::UnsupportedMediaType()
            .insert_header((actix_web::http::header::CONNECTION, "close"))
            .json(json!({
                "error": "content-encoding",
                "reason": "send the envelope as it is, without a Content-Encoding (it is encrypted: compression gains nothing)",
            })),
    )
}

async fn post_envelope(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> actix_web::Result<HttpResponse> {
    let body = match read_body(&req, payload, &shared).await? {
        Ok(body) => body,
        Err(refused) => return Ok(refused),
    };
    Ok(handle_envelope(body, shared).await)
}

async fn handle_envelope(body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let shared = shared.into_inner();
    let owner = shared.http_owner();
    // Counted until what it leased is recorded below: a drained node is not empty meanwhile.
    let _counted = shared.http_leases.request();
    let started = std::time::Instant::now();
    let mut out = match shared.mediator.handle(&body, TransportKind::Http, &owner).await {
        Ok(out) => out,
        Err(e) => {
            shared
                .metrics
                .rejected(e.code(), crate::protocols::v2::envelope_label(&body));
            tracing::info!(code = e.code(), "POST refused: {e}");
            return error_response(&e);
        }
    };
    if out.forward.is_some() {
        shared.metrics.forwards_received.inc();
        shared.metrics.forward_seconds.observe(started.elapsed().as_secs_f64());
    }
    if let Some(ForwardResult::Queued { duplicate }) = &out.forward {
        if *duplicate {
            shared.metrics.forwards_duplicate.inc();
        } else {
            shared.metrics.forwards_queued.inc();
        }
    }
    if out.acked > 0 {
        shared.metrics.acknowledged(out.acked, &out.ack_lags_ms);
    }
    if !out.leased.is_empty() {
        let v = out
            .connection
            .as_ref()
            .map(crate::protocols::v2::version_label)
            .unwrap_or("v1");
        shared.metrics.delivered("pickup", v, out.leased.len() as u64);
        if let Some(c) = &out.connection {
            let now = crate::protocols::now_ms();
            let until = now.saturating_add(shared.mediator.lease_ms);
            shared.http_leases.leased(&c.id, until, now);
        }
    }
    // Wake whoever holds the wallet's session; new messages may also wake the wallet by push
    // (no session anywhere). An acknowledgement wakes nobody: leases are per message with no
    // cap per connection, so removing delivered messages makes nothing else deliverable.
    shared.after_forward(&mut out);
    // A pickup 1.0 batch is removed only once it is in the response; else it goes back.
    let batch = out.ack_on_return.take();
    let (res, returned) = answer(&shared, out);
    if let Some(b) = batch {
        if returned {
            shared.metrics.delivered("pickup", "v1", b.ids.len() as u64);
        }
        shared.settle_batch(b, &owner, returned).await;
    }
    res
}

/// The response to a handled envelope, and whether it carries `replies[0]` (packed for the
/// connection, on the request's return route).
fn answer(shared: &Arc<Shared>, out: crate::protocols::Outcome) -> (HttpResponse, bool) {
    let Some(conn) = out.connection.clone() else {
        return (HttpResponse::Accepted().finish(), false);
    };
    if out.replies.is_empty() {
        return (HttpResponse::Accepted().finish(), false);
    }
    match out.return_route {
        ReturnRoute::All | ReturnRoute::Thread(_) => {
            // One reply fits in a response; any others go to the endpoint, if there is one.
            let mut replies = out.replies;
            let first = replies.remove(0);
            if !replies.is_empty() {
                let s = shared.clone();
                let c = conn.clone();
                actix_rt::spawn(async move { outbound::send_replies(&s, &c, &replies).await });
            }
            let content_type = if conn.protocol == crate::protocols::v2::PROTOCOL {
                crate::didcomm::v2::TYP_ENCRYPTED
            } else {
                outbound::ENVELOPE_CONTENT_TYPE
            };
            match shared.mediator.pack_for(&conn, &first) {
                Ok(packed) => (HttpResponse::Ok().content_type(content_type).body(packed), true),
                Err(e) => (error_response(&e), false),
            }
        }
        ReturnRoute::None => {
            let s = shared.clone();
            actix_rt::spawn(async move { outbound::send_replies(&s, &conn, &out.replies).await });
            (HttpResponse::Accepted().finish(), false)
        }
    }
}
